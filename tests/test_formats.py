"""Each instruction format: detection, normalization, and the field a bad record is blamed on."""

from __future__ import annotations

import pytest

from refinery.formats import RecordError, detect_format, flatten_oasst_tree, to_messages
from refinery.records import record_id


def roles(messages: list[dict]) -> list[str]:
    return [m["role"] for m in messages]


def rejected(obj: dict, fmt: str) -> RecordError:
    with pytest.raises(RecordError) as info:
        to_messages(obj, fmt)
    return info.value


# --------------------------------------------------------------------------- detection

@pytest.mark.parametrize("obj, fmt", [
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"instruction": "a", "instances": [{"input": "", "output": "b"}]}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "a"}]}, "openai"),
    ({"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}, "openai"),
    ({"message_tree_id": "t", "prompt": {"role": "prompter", "text": "a"}}, "oasst"),
    ({"message_id": "m", "role": "prompter", "text": "a", "replies": []}, "oasst"),
    ({"instruction": "a", "context": "", "response": "b", "category": "qa"}, "dolly"),
    ({"system_prompt": "", "question": "a", "response": "b"}, "openorca"),
    ({"system": "", "question": "a", "chosen": "b", "rejected": "c"}, "openorca"),
    ({"Instruction": "a prompt with no answer", "Skill": "Math"}, None),
    ({"text": "plain text"}, None),
])
def test_detect_format(obj, fmt):
    assert detect_format(obj) == fmt


def test_detect_format_of_a_non_object_is_none():
    assert detect_format(["a", "b"]) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- alpaca

def test_alpaca_joins_instruction_and_input():
    msgs = to_messages({"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "extra": 1}, "alpaca")
    assert msgs == [{"role": "user", "content": "Translate.\n\nBonjour"},
                    {"role": "assistant", "content": "Hello"}]


def test_alpaca_system_and_history_become_turns():
    obj = {"instruction": "q3", "input": "", "output": "a3", "system": "be brief",
           "history": [["q1", "a1"], ["q2", "a2"]]}
    msgs = to_messages(obj, "alpaca")
    assert roles(msgs) == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs] == ["be brief", "q1", "a1", "q2", "a2", "q3", "a3"]


def test_alpaca_seed_task_with_one_instance():
    obj = {"id": "seed_task_0", "instruction": "Add.", "instances": [{"input": "1+1", "output": "2"}]}
    assert to_messages(obj, "alpaca")[-1] == {"role": "assistant", "content": "2"}
    two = {"instruction": "Add.", "instances": [{"input": "1", "output": "1"}, {"input": "2", "output": "2"}]}
    err = rejected(two, "alpaca")
    assert err.field == "instances" and "2 instances" in err.reason


@pytest.mark.parametrize("obj, field, reason", [
    ({"instruction": "q", "input": "", "output": ["a", "b"]}, "output", "expected a string, got list"),
    ({"instruction": "q", "input": ""}, "output", "missing"),
    ({"instruction": "q", "output": "   "}, "output", "empty"),
    ({"instruction": 3, "output": "a"}, "instruction", "expected a string, got int"),
    ({"output": "a"}, "instruction", "missing"),
    ({"instruction": "", "input": "", "output": "a"}, "instruction", "empty"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "history[0]", "expected a [user, assistant] pair"),
    ({"instruction": "q", "output": "a", "history": [["u", 7]]}, "history[0][1]", "expected a string, got int"),
    ({"instruction": "q", "output": "a", "history": "u a"}, "history", "expected a list"),
])
def test_alpaca_bad_records_name_the_field(obj, field, reason):
    err = rejected(obj, "alpaca")
    assert err.field == field
    assert err.reason.startswith(reason)


# --------------------------------------------------------------------------- sharegpt

def test_sharegpt_speakers_map_to_roles():
    obj = {"id": "x", "system": "sys", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "weather?"}, {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": '{"t": 20}'}, {"from": "gpt", "value": "20 degrees"}]}
    msgs = to_messages(obj, "sharegpt")
    assert roles(msgs) == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert msgs[4]["content"] == '{"name": "w"}'


def test_sharegpt_tools_join_the_system_message():
    obj = {"tools": '[{"name": "w"}]', "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    assert to_messages(obj, "sharegpt")[0] == {"role": "system", "content": 'Available tools:\n[{"name": "w"}]'}


def test_sharegpt_unanswered_last_question_is_cut():
    obj = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                             {"from": "human", "value": "and?"}]}
    assert roles(to_messages(obj, "sharegpt")) == ["user", "assistant"]


def test_sharegpt_preference_pair_takes_the_chosen_answer():
    obj = {"conversations": [{"from": "human", "value": "a"}], "chosen": {"from": "gpt", "value": "good"},
           "rejected": {"from": "gpt", "value": "bad"}}
    assert to_messages(obj, "sharegpt")[-1] == {"role": "assistant", "content": "good"}


@pytest.mark.parametrize("obj, field, reason", [
    ({"conversations": []}, "conversations", "empty"),
    ({"conversations": "hi"}, "conversations", "expected a list, got str"),
    ({"conversations": [{"from": "alien", "value": "a"}]}, "conversations[0].from", "unknown speaker 'alien'"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 5}]},
     "conversations[1].value", "expected a string, got int"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
     "conversations[1].value", "empty"),
    ({"conversations": [{"from": "human", "value": "a"}, "b"]}, "conversations[1]", "expected an object"),
    ({"conversations": [{"from": "human", "value": "a"}]}, None, "no assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "a"}]}, None, "no user turn"),
])
def test_sharegpt_bad_records_name_the_field(obj, field, reason):
    err = rejected(obj, "sharegpt")
    assert (err.field, err.reason[:len(reason)]) == (field, reason)


# --------------------------------------------------------------------------- openai

def test_openai_messages():
    obj = {"messages": [{"role": "developer", "content": "sys"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}
    assert to_messages(obj, "openai") == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a"}]


def test_openai_preference_shape_uses_the_preferred_output():
    obj = {"input": {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
           "preferred_output": [{"role": "assistant", "content": "good"}],
           "non_preferred_output": [{"role": "assistant", "content": "bad"}]}
    msgs = to_messages(obj, "openai")
    assert roles(msgs) == ["system", "user", "assistant"] and msgs[-1]["content"] == "good"


@pytest.mark.parametrize("obj, field, reason", [
    ({"messages": []}, "messages", "empty"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role", "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, "messages[1].content", "missing"),
    ({"messages": [{"role": "user", "content": {"t": 1}}]}, "messages[0].content", "expected a string, got dict"),
    ({"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": "a"},
     "preferred_output", "expected a list, got str"),
])
def test_openai_bad_records_name_the_field(obj, field, reason):
    err = rejected(obj, "openai")
    assert (err.field, err.reason[:len(reason)]) == (field, reason)


# --------------------------------------------------------------------------- oasst

def node(text, role, rank=None, replies=(), **extra):
    return {"message_id": text, "text": text, "role": role, "rank": rank, "replies": list(replies), **extra}


TREE = {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": node("Q", "prompter", replies=[
    node("A-second", "assistant", rank=1, replies=[node("Q2-b", "prompter", replies=[node("A2-b", "assistant", rank=0)])]),
    node("A-best", "assistant", rank=0, replies=[
        node("Q2", "prompter", replies=[node("A2-worse", "assistant", rank=1), node("A2-best", "assistant", rank=0)]),
        node("Q2-unanswered", "prompter")]),
    node("A-deleted", "assistant", rank=None, deleted=True),
])}


def test_oasst_best_path_follows_the_lowest_rank():
    (best,) = flatten_oasst_tree(TREE)
    assert [m["content"] for m in best] == ["Q", "A-best", "Q2", "A2-best"]
    assert roles(best) == ["user", "assistant", "user", "assistant"]
    assert to_messages(TREE, "oasst") == best


def test_oasst_all_paths_end_with_an_answer_and_skip_deleted():
    paths = [[m["content"] for m in p] for p in flatten_oasst_tree(TREE, paths="all")]
    assert paths == [["Q", "A-best", "Q2", "A2-best"], ["Q", "A-best", "Q2", "A2-worse"],
                     ["Q", "A-best"],  # the unanswered follow-up is cut
                     ["Q", "A-second", "Q2-b", "A2-b"]]


def test_oasst_message_export_root_with_replies():
    root = node("Q", "prompter", replies=[node("A", "assistant", rank=0)], parent_id=None)
    assert [m["content"] for m in to_messages(root, "oasst")] == ["Q", "A"]


@pytest.mark.parametrize("obj, field, reason", [
    (node("A", "assistant", parent_id="p"), "parent_id", "a reply outside its tree"),
    ({"message_tree_id": "t", "prompt": node("Q", "prompter")}, "prompt.replies", "no assistant reply"),
    ({"message_tree_id": "t", "prompt": node("Q", "prompter", replies=[node(7, "assistant")])},
     "prompt.replies[0].text", "expected a string, got int"),
    ({"message_tree_id": "t", "prompt": node("Q", "prompter", replies=[node("A", "bot")])},
     "prompt.replies[0].role", "unknown role 'bot'"),
    ({"message_tree_id": "t", "prompt": "Q"}, "prompt", "expected an object"),
])
def test_oasst_bad_trees_name_the_field(obj, field, reason):
    err = rejected(obj, "oasst")
    assert (err.field, err.reason[:len(reason)]) == (field, reason)


# --------------------------------------------------------------------------- dolly, openorca

def test_dolly_context_follows_the_instruction():
    obj = {"instruction": "Who?", "context": "Ada wrote it.", "response": "Ada", "category": "closed_qa"}
    assert to_messages(obj, "dolly") == [{"role": "user", "content": "Who?\n\nAda wrote it."},
                                         {"role": "assistant", "content": "Ada"}]
    assert rejected({"instruction": "Who?", "response": None}, "dolly").field == "response"


def test_openorca_and_orca_dpo_pairs():
    orca = {"id": "niv.1", "system_prompt": "You are helpful.", "question": "q", "response": "a"}
    assert to_messages(orca, "openorca") == [{"role": "system", "content": "You are helpful."},
                                             {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pair = {"system": "", "question": "q", "chosen": "good", "rejected": "bad"}
    assert to_messages(pair, "openorca") == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}]
    assert rejected({"question": "q", "chosen": ["x"]}, "openorca").field == "chosen"


# --------------------------------------------------------------------------- across formats

def test_wrong_format_names_what_the_record_looks_like():
    err = rejected({"conversations": [{"from": "human", "value": "a"}]}, "alpaca")
    assert err.field == "instruction" and "looks like sharegpt" in err.reason


def test_same_conversation_same_id_in_every_format():
    a = to_messages({"instruction": "q", "input": "", "output": "a"}, "alpaca")
    b = to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt")
    c = to_messages({"instruction": "q", "context": "", "response": "a"}, "dolly")
    assert record_id(a) == record_id(b) == record_id(c)


def test_record_id_is_the_hash_of_the_canonical_json():
    # ids are stable across releases: record_id spells the JSON out for speed, and must give the
    # bytes json.dumps gives, escapes and all
    import hashlib
    import json
    import random

    rng = random.Random(0)
    alphabet = ['"', "\\", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "中", "\u2028", "😀", "/", "a", " ", "\r"]
    for _ in range(2000):
        messages = [{"role": rng.choice(["system", "user", "assistant"]),
                     "content": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))}
                    for _ in range(rng.randint(1, 4))]
        canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
        assert record_id(messages) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
    assert record_id([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == \
        hashlib.sha256(b'[["user","q"],["assistant","a"]]').hexdigest()[:16]


def test_unknown_format_name_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown format"):
        to_messages({}, "csv")
