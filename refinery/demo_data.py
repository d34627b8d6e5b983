"""The project's own demo corpus: computed instruction/response pairs with planted flaws.

``write_demo_corpus(cfg, out_dir)`` writes, deterministically from ``cfg.seed``:

- three training sources in different formats, so ingest's format handling is exercised:
  ``demo_alpaca.json`` (an Alpaca JSON array; its "line" is the element index + 1, as in
  refinery.records), ``demo_sharegpt.jsonl`` and ``demo_openai.jsonl`` (one record per line);
- ``heldout.jsonl``: the evaluation split, one task per line
  ``{id, family, prompt, answer, response, choices, label}``. ``answer`` is the short answer
  (``"68"``, ``"7, 19, 42"``, ``"nedrag"``); ``choices`` are four SHORT answers, the correct one at
  ``label``, the others plausible mistakes computed per family (off by one, sign error, wrong
  unit factor, reversed order...). A multiple-choice task scores ``prompt`` + ``ANSWER_PREFIX``
  followed by each choice; a generative task extracts ``ANSWER_REGEX``'s group from the model's
  text and compares it with ``answer``. ``response`` is the full reference response. No held-out
  problem (the numbers or word, whatever the template) appears in training;
- ``ground_truth.json``: every training record (id, file, line, kind, family or language), the
  planted exact and near duplicate pairs, the non-English records and the malformed lines, and
  counts. Record ids are ``refinery.records.record_id`` of the messages ``[user, assistant]``;
  files are named relative to ``out_dir``.

The ``records`` well-formed training records are task records (every family gets an equal
share, answers computed) plus ``exact_duplicates`` (identical messages, half of them in another
file and format), ``near_duplicates`` (a typo, a few extra words, changed punctuation or
whitespace, a sign-off; character 5-gram Jaccard with the original >= 0.82, raw and lowercased)
and ``non_english`` pairs written for the project in ten languages. Guarantees, checked by
tests/test_demo_data.py: no other pair of records reaches UNPLANTED_MAX_JACCARD; no training text
shares a word 13-gram (DecontamConfig.ngram) with a held-out task or contains a whole held-out
text of 8 to 12 words (refinery.decontam's rules), so decontamination removes nothing; fastText's lid.176 gives every
English record p(en) >= 0.5 and labels every non-English one with its language. The
``malformed_lines`` extra lines in the JSONL files are broken in one of MALFORMED_KINDS (in that
order); their ``field`` is the offending field as refinery.formats names it, None for the
line-level kinds (invalid_json, invalid_utf8).

Every response starts with its answer: ``"The answer is 68.\\n23 + 45 = 68, so the sum is 68."``.
The problem spaces are finite (the word families use WORDS): the default settings allow about
4,000 records; beyond that a clear ValueError names the family that ran out.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from refinery.config import DecontamConfig, DemoDataConfig, SourceConfig, load_profile
from refinery.records import conversation_text, record_id

ANSWER_PREFIX = "The answer is "
# The short answer in a response: everything up to the first full stop that ends a sentence
# ("2.5" and "7, 19, 42" stay whole).
ANSWER_REGEX = r"The answer is (.+?)\.(?=\s|$)"
LICENSE = "Apache-2.0"  # written by the project itself
FILES = {"alpaca": "demo_alpaca.json", "sharegpt": "demo_sharegpt.jsonl", "openai": "demo_openai.jsonl"}
HELDOUT_FILE = "heldout.jsonl"
GROUND_TRUTH_FILE = "ground_truth.json"
MALFORMED_KINDS = ("invalid_json", "missing_field", "wrong_type", "invalid_utf8", "empty_message")
NEAR_DUPLICATE_MIN_JACCARD = 0.8  # the dedup threshold the planted near duplicates must clear
_NEAR_MARGIN = 0.82  # planted pairs clear the threshold with a margin, also after lowercasing
UNPLANTED_MAX_JACCARD = 0.75  # two records of the same template are never this similar
SHINGLE = 5
DECONTAM_NGRAM = DecontamConfig().ngram  # held-out and training text share no word n-gram this long
_SHORT_WORDS = 8  # nor a held-out text of 8 to n-1 words (refinery.decontam matches those whole)


def extract_answer(text: str) -> str | None:
    """The short answer of a response written in the corpus style, or None."""
    m = re.search(ANSWER_REGEX, text)
    return m.group(1).strip() if m else None


def word_ngrams(text: str, n: int = DECONTAM_NGRAM) -> set[tuple[str, ...]]:
    """Lowercased word n-grams; words are runs of letters and digits (so "-15" reads as "15")."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _heldout_grams(rows: list[dict[str, Any]]) -> set[tuple[str, ...]]:
    """What refinery.decontam matches: the n-grams of held-out text and, for a text of at least
    _SHORT_WORDS but fewer than n words, its whole word sequence."""
    grams: set[tuple[str, ...]] = set()
    for r in rows:
        for text in (r["prompt"], r["answer"], r["response"], r["prompt"] + "\n" + r["response"]):
            words = tuple(re.findall(r"\w+", text.lower()))
            if len(words) >= DECONTAM_NGRAM:
                grams |= word_ngrams(text)
            elif len(words) >= _SHORT_WORDS:
                grams.add(words)
    return grams


def _training_grams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for n in range(_SHORT_WORDS, DECONTAM_NGRAM + 1) for i in range(len(words) - n + 1)}


def char_shingles(text: str, n: int = SHINGLE) -> set[str]:
    return {text[i:i + n] for i in range(max(len(text) - n + 1, 1))}


def _set_jaccard(a: set[str], b: set[str]) -> float:
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def jaccard(a: str, b: str, n: int = SHINGLE) -> float:
    return _set_jaccard(char_shingles(a, n), char_shingles(b, n))


# --------------------------------------------------------------------------- task families

# Short common English words (no palindromes): the material of the word families.
WORDS = tuple(dict.fromkeys("""
apple table chair river stone cloud garden window bread butter candle planet forest winter summer
spring autumn orange purple yellow silver golden pencil paper letter number basket bottle button
camera carpet castle circle cotton desert doctor dragon engine farmer father mother sister brother
finger flower friend guitar hammer helmet island jacket jungle kitten ladder lemon lizard magnet
marble meadow mirror monkey needle office parrot pepper pillow pirate pocket rabbit ribbon rocket
saddle shadow singer socket spider sponge statue sugar tablet teapot ticket tiger tomato tunnel
turtle valley violin wallet walnut water weather wizard yogurt zipper anchor animal answer arrow
artist badge banana beach beaver blanket blossom bridge bucket cabin cactus canvas carrot cherry
chicken cinema clock coffee comet copper cousin crayon cricket crystal cupboard dancer diamond
dinner donkey eagle elbow falcon feather fence field flame fountain fridge galaxy garlic giraffe
glove goose grape harbor honey horse hunter iceberg jelly kettle kitchen knight koala lantern
leopard library lobster lunch mango melon minute mountain muffin napkin nest noodle ocean olive
onion oyster palace panda parcel peach peanut pearl pelican penguin piano pickle pigeon pilot plate
pony potato puzzle quilt rainbow raven record robot saucer scarf school season shell shirt shovel
sleeve slipper snail soldier spoon squirrel story stove straw street summit sunset sweater teacher
thunder toast tower tractor travel trumpet tulip uncle velvet village vulture wagon whale whistle
willow wolf wool yacht zebra acorn apron attic bamboo barrel beard berry biscuit blender boulder
bracelet branch breeze brush cable camel canyon cargo cereal chalk cheese chimney clover coconut
collar compass cookie coral cradle crane crown cushion daisy dolphin drawer drum dune easel ember
fabric ferry fiddle flute forge fossil frost gadget garage gravel hedge hiker hollow insect ivory
jigsaw juice kernel lagoon lamp lettuce linen locket lumber maple marsh mitten mortar mustard
nickel oatmeal orbit otter paddle pasta pebble pillar plum pouch prairie pretzel pumpkin raisin
ranch reef saffron salmon sandal satchel sequin shelf shrimp sketch sleigh spinach sprout stable
stamp tassel thimble thistle timber trolley trowel tundra umbrella vanilla vessel waffle walrus
wheat wren bright quiet gentle happy simple clever silent rapid narrow humble brave calm eager
fancy fresh giant heavy jolly lively lucky merry modest noble polite proud quick rough shiny smooth
sturdy swift tender tidy vivid warm wild wise young ancient bitter broad cheap clean crisp dusty
early empty faint fierce flat fluffy frozen fuzzy glossy grand hasty hungry icy jagged kind little
loud mellow misty muddy neat nimble plain rusty salty sandy scary sharp sleepy slow snowy soft sour
spicy steep sticky stormy sunny sweet tall tiny tough vast weary windy wooden build carry climb
dance dream drink drive float gather glide jump laugh listen paint plant reach sing sleep smile
swim think wander whisper write market harvest journey lesson morning evening holiday picnic
concert battle kingdom machine feather blanket cottage orchard pasture glacier volcano meteor
""".split()))
assert all(w != w[::-1] and w.isalpha() and w.islower() for w in WORDS)

VOWELS = "aeiou"

TEMPLATES: dict[str, tuple[str, ...]] = {
    "addition": (
        "What is {a} + {b}?",
        "Add {a} and {b}.",
        "Calculate the sum of {a} and {b}.",
        "What do you get when you add {a} to {b}?",
        "Compute {a} plus {b}.",
    ),
    "subtraction": (
        "What is {a} - {b}?",
        "Subtract {b} from {a}.",
        "Calculate {a} minus {b}.",
        "What is left when you take {b} away from {a}?",
        "Compute {a} - {b}.",
    ),
    "multiplication": (
        "What is {a} times {b}?",
        "Multiply {a} by {b}.",
        "Calculate the product of {a} and {b}.",
        "How much is {a} multiplied by {b}?",
    ),
    "largest_number": (
        "What is the largest number in this list: {numbers}?",
        "Which of these numbers is the biggest: {numbers}?",
        "Find the maximum of {numbers}.",
        "Here are some numbers: {numbers}. Which one is the largest?",
    ),
    "sort_numbers": (
        "Sort these numbers from smallest to largest: {numbers}.",
        "Put {numbers} in ascending order.",
        "Arrange the following numbers in increasing order: {numbers}.",
        "Order these numbers from lowest to highest: {numbers}.",
    ),
    "next_in_sequence": (
        "What comes next in the sequence {terms}?",
        "Continue the pattern: {terms}, ...",
        "Find the next number in {terms}.",
        "What is the next term of the arithmetic sequence {terms}?",
    ),
    "unit_conversion": (
        "Convert {value} {src} to {dst}.",
        "How many {dst} are in {value} {src}?",
        "What is {value} {src} in {dst}?",
        "Express {value} {src} in {dst}.",
    ),
    "reverse_word": (
        "Reverse the word '{word}'.",
        "Spell '{word}' backwards.",
        "Write the letters of '{word}' in reverse order.",
        "What is '{word}' spelled backwards?",
    ),
    "count_vowels": (
        "How many vowels are in '{text}'?",
        "Count the vowels (a, e, i, o, u) in '{text}'.",
        "How many of the letters in '{text}' are vowels?",
        "Tell me the number of vowels in the words '{text}'.",
    ),
    "capitalize": (
        "Write '{phrase}' in capital letters.",
        "Convert '{phrase}' to uppercase.",
        "Rewrite '{phrase}' using only capital letters.",
        "Change '{phrase}' to all caps.",
    ),
}
FAMILIES = tuple(TEMPLATES)


@dataclass(frozen=True)
class _Problem:
    key: tuple  # what makes two problems the same, whatever the template
    slots: dict[str, Any]
    answer: str
    reasoning: str
    wrong: tuple[str, ...]  # plausible wrong answers, most plausible first


def _num_list(nums: Sequence[int]) -> str:
    return ", ".join(map(str, nums))


def _dec(x: Decimal) -> str:
    """A decimal without trailing zeros or exponent: 2.50 -> '2.5', 3E+2 -> '300'."""
    return format(x.normalize(), "f")


def _addition(rng: random.Random) -> _Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    s = a + b
    return _Problem(("addition", min(a, b), max(a, b)), {"a": a, "b": b}, str(s),
                    f"{a} + {b} = {s}, so the sum is {s}.",
                    tuple(map(str, (s + 1, s - 1, s + 10, s - 10, abs(a - b)))))


def _subtraction(rng: random.Random) -> _Problem:
    a, b = rng.sample(range(10, 100), 2)
    d = a - b
    return _Problem(("subtraction", a, b), {"a": a, "b": b}, str(d), f"{a} - {b} = {d}, so the result is {d}.",
                    tuple(map(str, (b - a, d + 1, d - 1, d + 10, d - 10))))


def _multiplication(rng: random.Random) -> _Problem:
    a, b = rng.randint(2, 9), rng.randint(2, 99)
    p = a * b
    return _Problem(("multiplication", min(a, b), max(a, b)), {"a": a, "b": b}, str(p),
                    f"{a} * {b} = {p}, so the product is {p}.",
                    tuple(map(str, (a * (b + 1), a * (b - 1), (a + 1) * b, (a - 1) * b, a + b, p + 10, p + 1))))


def _largest_number(rng: random.Random) -> _Problem:
    nums = rng.sample(range(1, 1000), rng.choice((4, 5)))
    m = max(nums)
    others = sorted((x for x in nums if x != m), reverse=True)
    return _Problem(("largest_number", *sorted(nums)), {"numbers": _num_list(nums)}, str(m),
                    f"{m} is larger than {_num_list(others[:-1])} and {others[-1]}.", tuple(map(str, others)))


def _sort_numbers(rng: random.Random) -> _Problem:
    n = rng.choice((3, 4, 5))
    while True:
        nums = rng.sample(range(1, 100), n)
        up = sorted(nums)
        if nums not in (up, up[::-1]):  # the prompt's order is itself a wrong answer
            break
    i = rng.randrange(n - 1)
    swapped = up[:i] + [up[i + 1], up[i]] + up[i + 2:]
    wrong = (up[::-1], nums, swapped, up[1:] + up[:1], [up[-1]] + up[:-1])
    return _Problem(("sort_numbers", *up), {"numbers": _num_list(nums)}, _num_list(up),
                    " < ".join(map(str, up)) + ", so this is the order from smallest to largest.",
                    tuple(_num_list(w) for w in wrong))


def _next_in_sequence(rng: random.Random) -> _Problem:
    start = rng.randint(-20, 60)
    step = rng.choice([s for s in range(-9, 16) if abs(s) >= 2])
    terms = [start + i * step for i in range(4)]
    nxt = start + 4 * step
    how = f"{step} more" if step > 0 else f"{-step} less"
    op = f"+ {step}" if step > 0 else f"- {-step}"
    return _Problem(("next_in_sequence", start, step), {"terms": _num_list(terms)}, str(nxt),
                    f"Each number is {how} than the one before, so {terms[-1]} {op} = {nxt}.",
                    tuple(map(str, (nxt + 1, nxt - 1, nxt + step, terms[-1]))))


# (source unit, target unit, one big unit in small units, big unit name, small unit name,
#  multiply?, the source values)
_UNITS = (
    ("centimeters", "meters", 100, "meter", "centimeters", False, [Decimal(n) for n in range(10, 2001, 5)]),
    ("minutes", "hours", 60, "hour", "minutes", False, [Decimal(n) for n in range(3, 601, 3)]),
    ("grams", "kilograms", 1000, "kilogram", "grams", False, [Decimal(n) for n in range(50, 10001, 50)]),
    ("meters", "centimeters", 100, "meter", "centimeters", True,
     [Decimal(k) / 10 for k in range(2, 100) if k != 10]),
    ("hours", "minutes", 60, "hour", "minutes", True, [Decimal(k) / 4 for k in range(2, 49) if k != 4]),
    ("kilometers", "meters", 1000, "kilometer", "meters", True,
     [Decimal(k) / 10 for k in range(2, 200) if k != 10]),
)


def _unit_conversion(rng: random.Random) -> _Problem:
    src, dst, k, big, small, multiply, values = rng.choice(_UNITS)
    value = rng.choice(values)
    if multiply:
        result = value * k
        wrong = (result / 10, result * 10, value * (100 if k == 60 else 10 * k), result * 100)
        how = f"{_dec(value)} * {k}"
    else:
        result = value / k
        wrong = (result * 10, result / 10, value * k, result * 100)
        how = f"{_dec(value)} / {k}"
    return _Problem(("unit_conversion", src, dst, value), {"value": _dec(value), "src": src, "dst": dst},
                    _dec(result), f"One {big} is {k} {small}, so {how} = {_dec(result)}.",
                    tuple(_dec(w) for w in wrong))


def _reverse_word(rng: random.Random) -> _Problem:
    word = rng.choice(WORDS)
    rev = word[::-1]
    wrong = (word, rev[1] + rev[0] + rev[2:], rev[:-1], rev[0] + rev[2] + rev[1] + rev[3:], word[1:] + word[0])
    return _Problem(("reverse_word", word), {"word": word}, rev,
                    f"I read the letters of the word '{word}' from the last one back to the first one.", wrong)


def _count_vowels(rng: random.Random) -> _Problem:
    # Two words, not one: single words one letter apart ('cable', 'table') made records that
    # were near duplicates of each other.
    words = rng.sample(WORDS, 2)
    text = " ".join(words)
    found = [c for c in text if c in VOWELS]
    v, letters = len(found), len(text) - 1
    wrong = (v + 1, v - 1, letters - v, v + 2, letters)
    return _Problem(("count_vowels", *words), {"text": text}, str(v),
                    f"The vowels in '{text}' are {', '.join(found)}, which makes {v}.",
                    tuple(str(w) for w in wrong if w >= 0))


def _capitalize(rng: random.Random) -> _Problem:
    words = rng.sample(WORDS, rng.choice((2, 3)))
    phrase = " ".join(words)
    wrong = (phrase.title(), phrase.capitalize(), phrase, words[0].upper() + " " + " ".join(words[1:]))
    return _Problem(("capitalize", *words), {"phrase": phrase}, phrase.upper(),
                    f"Each letter of '{phrase}' is changed to its capital form.", wrong)


_SAMPLERS: dict[str, Callable[[random.Random], _Problem]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "largest_number": _largest_number,
    "sort_numbers": _sort_numbers,
    "next_in_sequence": _next_in_sequence,
    "unit_conversion": _unit_conversion,
    "reverse_word": _reverse_word,
    "count_vowels": _count_vowels,
    "capitalize": _capitalize,
}
assert tuple(_SAMPLERS) == FAMILIES


def _draw(family: str, n: int, rng: random.Random, taken: set[tuple]) -> list[_Problem]:
    """n problems of a family whose keys are not in ``taken`` (which grows)."""
    out: list[_Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"demo data: family {family!r} ran out of distinct problems after {len(out)} "
                             f"of {n}; lower ingest.demo.records or heldout_per_family")
        p = _SAMPLERS[family](rng)
        if p.key not in taken and len(_wrong_answers(p)) == 3:
            taken.add(p.key)
            out.append(p)
    return out


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def _draw_training(family: str, n: int, rng: random.Random, taken: set[tuple], banned_ngrams: set[tuple[str, ...]]
                   ) -> list[tuple[_Problem, str, list[dict[str, str]]]]:
    """n (problem, template, messages) of a family, none of them a near duplicate of another.

    Two problems rendered with the same template can be near duplicates by chance (250 and 255
    centimeters); such a draw is skipped, so the planted pairs are the only near duplicates. So is
    one that shares a word n-gram with a held-out task ("Which one is the largest? The answer is
    592. 592 is larger than" recurs whenever two lists have the same maximum).
    """
    vocab: dict[str, int] = {}

    def bits(text: str) -> int:  # a shingle set as a bit mask: Jaccard by popcount is ~20x faster
        index = [vocab.setdefault(s, len(vocab)) for s in char_shingles(text)]
        buf = bytearray(len(vocab) // 8 + 1)
        for i in index:
            buf[i >> 3] |= 1 << (i & 7)
        return int.from_bytes(buf, "little")

    def similar(x: int, y: int, threshold: float = UNPLANTED_MAX_JACCARD) -> bool:
        return (x & y).bit_count() >= threshold * (x | y).bit_count()

    accepted: dict[str, list[tuple[int, int]]] = {t: [] for t in TEMPLATES[family]}
    out: list[tuple[_Problem, str, list[dict[str, str]]]] = []
    while len(out) < n:
        try:
            (p,) = _draw(family, 1, rng, taken)
        except ValueError:
            raise ValueError(f"demo data: family {family!r} has only {len(out)} of the {n} problems asked for "
                             f"that are neither held out nor near duplicates of each other; lower "
                             f"ingest.demo.records or heldout_per_family") from None
        # A problem too close to another one in one template may fit in the next.
        for template in rng.sample(TEMPLATES[family], len(TEMPLATES[family])):
            messages = _messages(template.format(**p.slots), _response(p))
            text = conversation_text(messages)
            if _training_grams(text) & banned_ngrams:
                continue
            raw, norm = bits(text), bits(_normalized(text))
            # Lowercasing moves a similarity by a few points: compare that only where it could matter.
            if not any(similar(raw, a, UNPLANTED_MAX_JACCARD - 0.1) and (similar(raw, a) or similar(norm, b))
                       for a, b in accepted[template]):
                accepted[template].append((raw, norm))
                out.append((p, template, messages))
                break
    return out


def _messages(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _response(p: _Problem) -> str:
    return f"{ANSWER_PREFIX}{p.answer}.\n{p.reasoning}"


def _wrong_answers(p: _Problem) -> list[str]:
    """The three most plausible distinct wrong answers (fewer when the family has none left)."""
    return [w for w in dict.fromkeys(p.wrong) if w != p.answer][:3]


def _choices(p: _Problem, rng: random.Random) -> tuple[list[str], int]:
    choices = _wrong_answers(p) + [p.answer]
    rng.shuffle(choices)
    return choices, choices.index(p.answer)


# --------------------------------------------------------------------------- non-English

# Instruction/response pairs written for the project (language code as fastText labels it).
NON_ENGLISH: tuple[tuple[str, str, str], ...] = (
    ("de", "Erkläre kurz, warum der Himmel am Tag blau aussieht.",
     "Das Sonnenlicht wird an den Molekülen der Luft gestreut, und kurzwelliges blaues Licht wird dabei "
     "viel stärker gestreut als rotes. Deshalb sehen wir tagsüber einen blauen Himmel."),
    ("de", "Gib mir drei Tipps, wie ich morgens besser aus dem Bett komme.",
     "Stelle den Wecker außer Reichweite, damit du aufstehen musst. Geh jeden Abend ungefähr zur gleichen "
     "Zeit schlafen und öffne nach dem Aufwachen sofort die Vorhänge, damit Tageslicht ins Zimmer fällt."),
    ("de", "Wie lange sollte man Spaghetti kochen?",
     "Die meisten Spaghetti brauchen acht bis zehn Minuten in sprudelnd kochendem Salzwasser. Am besten "
     "probierst du eine Nudel kurz vor Ende der Kochzeit, damit sie noch bissfest ist."),
    ("de", "Schreibe einen kurzen Satz über den Herbst in den Bergen.",
     "Im Herbst färben sich die Wälder in den Bergen rot und golden, und am Morgen liegt oft dichter "
     "Nebel über den stillen Tälern."),
    ("fr", "Pourquoi les feuilles des arbres changent-elles de couleur en automne ?",
     "Quand les jours raccourcissent, les arbres cessent de produire de la chlorophylle, le pigment vert "
     "des feuilles. Les autres pigments, jaunes et orange, deviennent alors visibles."),
    ("fr", "Peux-tu me donner une idée de dîner simple et rapide ?",
     "Tu peux préparer une omelette aux champignons avec une salade verte. Il suffit de faire revenir les "
     "champignons dans une poêle, puis d'ajouter les œufs battus et de laisser cuire quelques minutes."),
    ("fr", "Comment puis-je mieux retenir le vocabulaire d'une langue étrangère ?",
     "Révise les nouveaux mots un peu chaque jour plutôt que tout d'un coup, et utilise-les dans des "
     "phrases qui te concernent. Les cartes mémoire avec répétition espacée sont aussi très efficaces."),
    ("fr", "Décris en une phrase une matinée au bord de la mer.",
     "Le soleil se lève doucement sur la mer calme, les mouettes crient au-dessus du port et l'air sent "
     "le sel et le pain chaud."),
    ("es", "¿Por qué es importante beber suficiente agua durante el día?",
     "El agua ayuda a regular la temperatura del cuerpo, transporta los nutrientes y permite que los "
     "riñones eliminen los desechos. Cuando no bebemos lo suficiente, aparecen el cansancio y el dolor "
     "de cabeza."),
    ("es", "Dame una receta sencilla para hacer guacamole en casa.",
     "Machaca dos aguacates maduros con un tenedor y añade cebolla picada, tomate, cilantro, sal y el "
     "zumo de medio limón. Mezcla todo bien y sírvelo enseguida con totopos."),
    ("es", "¿Qué puedo hacer para dormir mejor por la noche?",
     "Intenta acostarte siempre a la misma hora y evita las pantallas durante la última hora antes de "
     "dormir. Una habitación fresca, oscura y silenciosa también ayuda mucho."),
    ("es", "Escribe una frase sobre una tarde de lluvia en la ciudad.",
     "La lluvia golpea suavemente las ventanas mientras la gente camina deprisa con sus paraguas de "
     "colores por las calles mojadas."),
    ("it", "Qual è la differenza tra il caffè espresso e il caffè americano?",
     "L'espresso è un caffè concentrato, preparato facendo passare acqua molto calda sotto pressione "
     "attraverso il caffè macinato. L'americano è un espresso allungato con acqua calda, quindi ha un "
     "gusto più leggero."),
    ("it", "Consigliami un modo per imparare a suonare la chitarra da solo.",
     "Comincia con pochi accordi semplici e allenati ogni giorno per almeno un quarto d'ora. Scegli "
     "canzoni che ti piacciono, così resterai motivato anche quando le dita fanno male."),
    ("it", "Perché in estate le giornate sono più lunghe?",
     "D'estate il nostro emisfero è inclinato verso il Sole, quindi il Sole sorge prima, tramonta più "
     "tardi e resta più a lungo sopra l'orizzonte."),
    ("it", "Scrivi una breve frase su una passeggiata in campagna.",
     "Camminiamo lentamente tra i campi di grano, mentre il vento muove gli ulivi e in lontananza "
     "suonano le campane del paese."),
    ("pt", "Como posso economizar dinheiro nas compras do supermercado?",
     "Faça uma lista antes de sair de casa e siga-a, compare os preços por quilo e evite ir às compras "
     "com fome. Comprar frutas e legumes da estação também costuma sair mais barato."),
    ("pt", "Explique de forma simples o que é a fotossíntese.",
     "A fotossíntese é o processo em que as plantas usam a luz do sol, a água e o gás carbônico para "
     "produzir açúcar. Como resultado, elas liberam oxigênio para o ar."),
    ("pt", "Qual é a melhor maneira de começar a correr?",
     "Comece devagar, alternando um minuto de corrida com dois minutos de caminhada, três vezes por "
     "semana. Aumente o tempo de corrida aos poucos e use um tênis confortável."),
    ("pt", "Escreva uma frase sobre um domingo de sol na praia.",
     "No domingo de sol, as crianças constroem castelos de areia enquanto os pais descansam à sombra dos "
     "guarda-sóis e ouvem o barulho das ondas."),
    ("nl", "Waarom fietsen zoveel mensen in Nederland?",
     "Nederland is vlak, de afstanden zijn kort en er zijn overal veilige fietspaden. Daardoor is de "
     "fiets vaak sneller en goedkoper dan de auto of de bus."),
    ("nl", "Hoe maak ik een lekkere kop thee?",
     "Breng vers water aan de kook en giet het over het theezakje of de losse blaadjes. Laat de thee drie "
     "tot vijf minuten trekken en haal daarna het zakje eruit, anders wordt de smaak bitter."),
    ("nl", "Geef me een tip om beter te leren voor een examen.",
     "Verdeel de stof over meerdere dagen en toets jezelf regelmatig met oefenvragen. Neem ook genoeg "
     "pauzes, want een uitgerust hoofd onthoudt veel meer."),
    ("nl", "Schrijf een korte zin over een winteravond.",
     "Buiten sneeuwt het zachtjes, en binnen zitten we met warme chocolademelk bij de kachel te luisteren "
     "naar de wind."),
    ("pl", "Dlaczego warto codziennie chodzić na spacer?",
     "Codzienny spacer poprawia krążenie, wzmacnia serce i pomaga się zrelaksować po pracy. Ruch na "
     "świeżym powietrzu poprawia też nastrój i sen."),
    ("pl", "Jak przygotować prostą zupę pomidorową?",
     "Podsmaż cebulę i czosnek na oliwie, dodaj pokrojone pomidory i bulion, a następnie gotuj wszystko "
     "przez około dwadzieścia minut. Na koniec zmiksuj zupę i dopraw ją solą, pieprzem i bazylią."),
    ("pl", "Co zrobić, żeby rośliny doniczkowe dobrze rosły?",
     "Postaw je w jasnym miejscu, ale nie na pełnym słońcu, i podlewaj dopiero wtedy, gdy ziemia jest "
     "sucha. Raz w miesiącu warto też dodać trochę nawozu."),
    ("pl", "Napisz jedno zdanie o jesiennym lesie.",
     "W jesiennym lesie pachnie grzybami, a pod stopami szeleszczą żółte i czerwone liście."),
    ("ru", "Почему зимой на улице темнеет так рано?",
     "Зимой наше полушарие наклонено от Солнца, поэтому солнце поднимается невысоко и светит совсем "
     "недолго. Из-за этого день короткий, а вечер наступает рано."),
    ("ru", "Посоветуй, как быстрее выучить таблицу умножения.",
     "Учите таблицу понемногу, по одному числу в день, и повторяйте её вслух. Хорошо помогают карточки и "
     "короткие игры, в которых нужно быстро назвать ответ."),
    ("ru", "Как правильно заваривать чёрный чай?",
     "Ополосните чайник кипятком, положите в него заварку и залейте горячей водой. Дайте чаю настояться "
     "четыре или пять минут, а затем разлейте его по чашкам."),
    ("ru", "Напиши одно предложение о летнем вечере у реки.",
     "Летним вечером над рекой поднимается лёгкий туман, а в траве громко стрекочут кузнечики."),
    ("zh", "请简单解释一下为什么会下雨。",
     "太阳把地面和海洋里的水加热，水变成水蒸气升到空中。水蒸气在高空遇冷凝结成小水滴，小水滴越聚越多、"
     "越来越重，最后就落下来变成了雨。"),
    ("zh", "给我一些提高学习效率的建议。",
     "每天制定一个简单的计划，先完成最重要的任务。学习的时候把手机放远一点，每学习四十分钟就休息一会儿，"
     "晚上保证充足的睡眠。"),
    ("zh", "怎样做一道简单的西红柿炒鸡蛋？",
     "先把鸡蛋打散炒熟后盛出来，再把切好的西红柿放进锅里翻炒出汁。然后把鸡蛋倒回锅里，加一点盐和糖，"
     "翻炒均匀就可以出锅了。"),
    ("zh", "用一句话描述秋天的公园。",
     "秋天的公园里，金黄的树叶在风中慢慢飘落，老人们坐在长椅上晒太阳，孩子们在草地上开心地奔跑。"),
    ("ja", "日本でお花見が人気なのはなぜですか。",
     "春になると桜が一斉に咲き、短い期間しか見られないからです。家族や友だちと桜の木の下でお弁当を"
     "食べながら、季節の移り変わりを楽しむのが昔からの習慣になっています。"),
    ("ja", "朝ごはんを食べることの良いところを教えてください。",
     "朝ごはんを食べると体温が上がり、頭がすっきりして集中しやすくなります。また、一日のエネルギーを"
     "しっかり取ることができるので、昼まで元気に過ごせます。"),
    ("ja", "おいしいおにぎりの作り方を簡単に説明してください。",
     "炊きたてのご飯を少し冷まして、手を水でぬらしてから塩をつけます。ご飯に好きな具を入れて、三角の"
     "形になるようにやさしくにぎり、最後にのりを巻いたらできあがりです。"),
    ("ja", "雨の日の過ごし方について一文で書いてください。",
     "雨の日は家で温かいお茶を飲みながら、窓の外の雨の音を聞いて好きな本をゆっくり読むのがいちばんです。"),
)


def _pick_non_english(n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """n pairs spread over the languages: one of each language before a second of any."""
    if n > len(NON_ENGLISH):
        raise ValueError(f"demo data: non_english={n} but only {len(NON_ENGLISH)} non-English pairs are written")
    by_lang: dict[str, list[tuple[str, str, str]]] = {}
    for pair in NON_ENGLISH:
        by_lang.setdefault(pair[0], []).append(pair)
    langs = list(by_lang)
    rng.shuffle(langs)
    for pairs in by_lang.values():
        rng.shuffle(pairs)
    rounds = max(len(p) for p in by_lang.values())
    order = [by_lang[lang][i] for i in range(rounds) for lang in langs if i < len(by_lang[lang])]
    return order[:n]


# --------------------------------------------------------------------------- near duplicates

_TRAILING = ("Thanks!", "Please keep it short.", "Thank you in advance.", "I need this for my homework.")
_SIGNOFFS = ("Hope this helps!", "Let me know if you have more questions.", "Happy to help.")
NEAR_VARIANTS = ("typo", "trailing_words", "typo_and_punctuation", "whitespace_and_trailing_words", "signoff")


def _typo(template: str, rng: random.Random) -> str | None:
    """Swap two different neighbouring letters inside one word of the template's own text."""
    spots = []
    for part in re.finditer(r"\{[a-z]+\}|[A-Za-z]{4,}", template):
        word = part.group()
        if word.startswith("{"):
            continue  # a slot: changing it would change the answer
        spots += [part.start() + i for i in range(1, len(word) - 2) if word[i] != word[i + 1]]
    if not spots:
        return None
    i = rng.choice(spots)
    return template[:i] + template[i + 1] + template[i] + template[i + 2:]


def _near_variant(template: str, p: _Problem, kind: str, rng: random.Random) -> tuple[str, str] | None:
    """The prompt and response of a near duplicate; None when the template allows no such change."""
    prompt_t, response = template, _response(p)
    if kind in ("typo", "typo_and_punctuation"):
        prompt_t = _typo(prompt_t, rng)
        if prompt_t is None:
            return None
    if kind == "typo_and_punctuation":
        prompt_t = prompt_t[:-1] + ("??" if prompt_t.endswith("?") else "!") if prompt_t[-1] in ".?" \
            else prompt_t + "?"
    if kind == "whitespace_and_trailing_words":
        gaps = [m.start() for m in re.finditer(" ", prompt_t)]
        i = rng.choice(gaps)
        prompt_t = prompt_t[:i] + "  " + prompt_t[i + 1:]
    if kind in ("trailing_words", "whitespace_and_trailing_words"):
        prompt_t += " " + rng.choice(_TRAILING)
    if kind == "signoff":
        response += " " + rng.choice(_SIGNOFFS)
    return prompt_t.format(**p.slots), response


def _similar(a: str, b: str) -> float:
    """Jaccard of the raw texts and of lowercased, whitespace-collapsed ones: the lower one."""
    return min(jaccard(a, b), jaccard(_normalized(a), _normalized(b)))


# --------------------------------------------------------------------------- malformed lines


def _malformed(kind: str, fmt: str, prompt: str, response: str) -> tuple[bytes, str | None]:
    """One broken JSONL line (bytes, without newline) and the offending field (None: the whole line)."""
    if fmt == "sharegpt":
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": response}]
        container, answer_field, text_key = "conversations", "conversations[1].value", "value"
    else:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        container, answer_field, text_key = "messages", "messages[1].content", "content"
    if kind == "invalid_json":  # cut off half-way, as a crashed writer leaves it
        text = json.dumps({container: turns}, ensure_ascii=False)
        return text[: len(text) // 2].encode("utf-8"), None
    if kind == "missing_field":
        del turns[1][text_key]
        return json.dumps({container: turns}, ensure_ascii=False).encode("utf-8"), answer_field
    if kind == "wrong_type":  # the conversation as one string instead of a list of turns
        return json.dumps({container: f"{prompt}\n{response}"}, ensure_ascii=False).encode("utf-8"), container
    if kind == "invalid_utf8":  # a Latin-1 byte inside the user text
        turns[0][text_key] = prompt.replace(" ", " \x00", 1)
        raw = json.dumps({container: turns}, ensure_ascii=False).encode("utf-8")
        return raw.replace(b"\\u0000", b"\xe9", 1), None  # a line-level error, like invalid_json
    if kind == "empty_message":
        turns[1][text_key] = ""
        return json.dumps({container: turns}, ensure_ascii=False).encode("utf-8"), answer_field
    raise ValueError(kind)


# --------------------------------------------------------------------------- the corpus


@dataclass
class DemoCorpus:
    """What write_demo_corpus wrote: the training sources, the held-out split, the ground truth."""

    sources: list[SourceConfig]
    heldout_path: Path
    ground_truth_path: Path
    counts: dict[str, Any]


def demo_sources(out_dir: Path) -> list[SourceConfig]:
    """The SourceConfigs of a demo corpus written to out_dir (also after the directory moved)."""
    folder = Path(out_dir).resolve()
    return [SourceConfig(name=f"demo_{fmt}", path=str(folder / name), format=fmt, license=LICENSE)  # type: ignore[arg-type]
            for fmt, name in FILES.items()]


@dataclass
class _Entry:
    messages: list[dict[str, str]]
    kind: str  # task | exact_duplicate | near_duplicate | non_english
    family: str | None = None
    lang: str | None = None
    file: str = ""
    line: int = 0

    @property
    def id(self) -> str:
        return record_id(self.messages)

    def where(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line}


def _encode(fmt: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    user, assistant = messages[0]["content"], messages[1]["content"]
    if fmt == "alpaca":
        return {"instruction": user, "input": "", "output": assistant}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]}
    return {"messages": [dict(m) for m in messages]}


def _heldout_rows(heldout: dict[str, list[_Problem]], rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for f, problems in heldout.items():
        for p in problems:
            prompt, response = rng.choice(TEMPLATES[f]).format(**p.slots), _response(p)
            choices, label = _choices(p, rng)
            rows.append({"id": record_id(_messages(prompt, response)), "family": f, "prompt": prompt,
                         "answer": p.answer, "response": response, "choices": choices, "label": label})
    return rows


def _plant_near_duplicates(tasks: list[_Entry], problems: list[tuple[_Problem, str]], candidates: list[int],
                           n: int, ids: set[str], rng: random.Random) -> list[tuple[int, _Entry, str, float]]:
    """(original index, near duplicate, variant, Jaccard) for n of the candidate task records."""
    near: list[tuple[int, _Entry, str, float]] = []
    for i in candidates:
        if len(near) == n:
            break
        p, template = problems[i]
        original = conversation_text(tasks[i].messages)
        for kind in rng.sample(NEAR_VARIANTS, len(NEAR_VARIANTS)):
            variant = _near_variant(template, p, kind, rng)
            if variant is None:
                continue
            entry = _Entry(_messages(*variant), "near_duplicate", family=tasks[i].family)
            text = conversation_text(entry.messages)
            if _NEAR_MARGIN <= _similar(original, text) < 1 and entry.id not in ids:
                near.append((i, entry, kind, jaccard(original, text)))
                ids.add(entry.id)
                break
    if len(near) < n:
        raise ValueError(f"demo data: could plant only {len(near)} of {n} near duplicates")
    return near


def _malformed_lines(n: int, rng: random.Random, taken: set[tuple]) -> list[tuple[str, bytes, str, str | None]]:
    """(format, line, kind, field) for n broken lines, from problems used nowhere else."""
    jsonl = [f for f, name in FILES.items() if name.endswith(".jsonl")]
    problems = [p for f in FAMILIES for p in _draw(f, -(-n // len(FAMILIES)), rng, taken)]
    rng.shuffle(problems)
    out = []
    for j, p in enumerate(problems[:n]):
        fmt, kind = jsonl[j % len(jsonl)], MALFORMED_KINDS[j % len(MALFORMED_KINDS)]
        raw, field = _malformed(kind, fmt, rng.choice(TEMPLATES[p.key[0]]).format(**p.slots), _response(p))
        out.append((fmt, raw, kind, field))
    return out


def write_demo_corpus(cfg: DemoDataConfig, out_dir: Path) -> DemoCorpus:
    """Write the demo corpus into out_dir (a staging directory); the same cfg gives the same bytes."""
    out_dir = Path(out_dir)
    planted = cfg.exact_duplicates + cfg.near_duplicates + cfg.non_english
    n_tasks = cfg.records - planted
    needed = max(len(FAMILIES), cfg.exact_duplicates + cfg.near_duplicates)
    if n_tasks < needed:
        raise ValueError(f"demo data: records={cfg.records} leaves {n_tasks} task records after {planted} "
                         f"planted ones; need at least {needed}")
    rng = random.Random(f"refinery-demo:{cfg.seed}")

    # Held-out problems first, from their own stream: their keys are then barred from training,
    # and training text shares no word n-gram with them, so decontamination removes nothing.
    taken: set[tuple] = set()
    held_rng = random.Random(f"refinery-demo-heldout:{cfg.seed}")
    heldout = {f: _draw(f, cfg.heldout_per_family, held_rng, taken) for f in FAMILIES}
    heldout_rows = _heldout_rows(heldout, held_rng)
    heldout_ngrams = _heldout_grams(heldout_rows)

    per_family = {f: n_tasks // len(FAMILIES) + (i < n_tasks % len(FAMILIES)) for i, f in enumerate(FAMILIES)}
    tasks: list[_Entry] = []
    problems: list[tuple[_Problem, str]] = []  # parallel to tasks: problem and template
    for f in FAMILIES:
        for p, template, messages in _draw_training(f, per_family[f], rng, taken, heldout_ngrams):
            tasks.append(_Entry(messages, "task", family=f))
            problems.append((p, template))

    # Planted records; the originals of duplicates are distinct task records.
    order = rng.sample(range(len(tasks)), len(tasks))
    exact_src = order[: cfg.exact_duplicates]
    exact = [_Entry([dict(m) for m in tasks[i].messages], "exact_duplicate", family=tasks[i].family)
             for i in exact_src]
    ids = {e.id for e in tasks}
    near = _plant_near_duplicates(tasks, problems, order[cfg.exact_duplicates:], cfg.near_duplicates, ids, rng)
    foreign = [_Entry(_messages(q, a), "non_english", lang=lang)
               for lang, q, a in _pick_non_english(cfg.non_english, rng)]
    if len(ids | {e.id for e in foreign}) != len(tasks) + len(near) + len(foreign):
        raise AssertionError("demo data: an unplanted exact duplicate slipped in")

    # Files: records round-robin over the formats; every other exact copy goes to another file.
    fmts = list(FILES)
    files: dict[str, list[_Entry]] = {f: [] for f in fmts}
    spread = tasks + [e for _, e, _, _ in near] + foreign
    fmt_of: dict[int, str] = {}
    for rank, k in enumerate(rng.sample(range(len(spread)), len(spread))):
        fmt_of[k] = fmts[rank % len(fmts)]
        files[fmt_of[k]].append(spread[k])
    for j, (i, e) in enumerate(zip(exact_src, exact)):
        files[fmt_of[i] if j % 2 == 0 else rng.choice([f for f in fmts if f != fmt_of[i]])].append(e)
    lines: dict[str, list[_Entry | bytes]] = {}
    for f in fmts:
        rng.shuffle(files[f])
        lines[f] = list(files[f])
    bad = _malformed_lines(cfg.malformed_lines, rng, taken)
    for f, raw, _, _ in bad:  # between the records of the JSONL files
        lines[f].insert(rng.randint(0, len(lines[f])), raw)
    line_of = {id(item): n for f in fmts for n, item in enumerate(lines[f], 1)}
    for f in fmts:
        for e in files[f]:
            e.file, e.line = FILES[f], line_of[id(e)]
    malformed = sorted(({"file": FILES[f], "line": line_of[id(raw)], "format": f, "kind": kind, "field": field}
                        for f, raw, kind, field in bad), key=lambda m: (m["file"], m["line"]))

    train_prompts = {e.messages[0]["content"] for es in files.values() for e in es}
    if any(r["prompt"] in train_prompts for r in heldout_rows):
        raise AssertionError("demo data: a held-out prompt is in the training corpus")

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in fmts:
        if FILES[f].endswith(".jsonl"):
            body = b"".join((item if isinstance(item, bytes) else
                             json.dumps(_encode(f, item.messages), ensure_ascii=False).encode("utf-8")) + b"\n"
                            for item in lines[f])
        else:  # a JSON array: an element's "line" is its index + 1
            body = (json.dumps([_encode(f, e.messages) for e in files[f]], ensure_ascii=False, indent=1)
                    + "\n").encode("utf-8")
        (out_dir / FILES[f]).write_bytes(body)
    heldout_path = out_dir / HELDOUT_FILE
    heldout_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in heldout_rows), "utf-8")

    every = sorted((e for es in files.values() for e in es), key=lambda e: (e.file, e.line))
    counts: dict[str, Any] = {
        "records": len(every),
        "task_records": len(tasks),
        "per_family": per_family,
        "exact_duplicates": len(exact),
        "near_duplicates": len(near),
        "non_english": len(foreign),
        "malformed_lines": len(malformed),
        "unique_english_records": len(tasks) + len(near),
        "heldout": len(heldout_rows),
        "heldout_per_family": {f: len(heldout[f]) for f in FAMILIES},
        "per_file": {FILES[f]: {"records": len(files[f]), "malformed_lines": sum(m["format"] == f for m in malformed)}
                     for f in fmts},
    }
    truth = {
        "generator": "refinery.demo_data",
        "config": cfg.model_dump(),
        "answer_regex": ANSWER_REGEX,
        "near_duplicate_min_jaccard": NEAR_DUPLICATE_MIN_JACCARD,
        "shingle": f"char-{SHINGLE}-gram of refinery.records.conversation_text",
        "files": {**FILES, "heldout": HELDOUT_FILE},
        "counts": counts,
        "records": [{"id": e.id, **e.where(), "kind": e.kind, "family": e.family, "lang": e.lang} for e in every],
        "exact_duplicates": [{"id": e.id, "original": tasks[i].where(), "duplicate": e.where()}
                             for i, e in zip(exact_src, exact)],
        "near_duplicates": [{"original_id": tasks[i].id, "duplicate_id": e.id, "original": tasks[i].where(),
                             "duplicate": e.where(), "variant": kind, "jaccard": round(sim, 4)}
                            for i, e, kind, sim in near],
        "non_english": [{"id": e.id, "lang": e.lang, **e.where()} for e in foreign],
        "malformed": malformed,
    }
    truth_path = out_dir / GROUND_TRUTH_FILE
    truth_path.write_text(json.dumps(truth, ensure_ascii=False, indent=1) + "\n", "utf-8")
    return DemoCorpus(demo_sources(out_dir), heldout_path, truth_path, counts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m refinery.demo_data", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--profile", help="take ingest.demo from this profile (default: DemoDataConfig's defaults)")
    ap.add_argument("--records", type=int)
    ap.add_argument("--seed", type=int)
    args = ap.parse_args(argv)
    from refinery.cli import config_with_flags, run_cli

    def work() -> dict[str, Any]:
        cfg = config_with_flags((load_profile(args.profile).ingest.demo if args.profile else None) or DemoDataConfig(),
                                {"records": args.records, "seed": args.seed})
        t0 = time.perf_counter()
        corpus = write_demo_corpus(cfg, args.out_dir)
        return {"out_dir": str(args.out_dir.resolve()), "config": cfg.model_dump(),
                "sources": [s.model_dump() for s in corpus.sources], "heldout": str(corpus.heldout_path),
                "ground_truth": str(corpus.ground_truth_path), "counts": corpus.counts,
                "seconds": round(time.perf_counter() - t0, 3)}

    return run_cli(work)

if __name__ == "__main__":
    sys.exit(main())
