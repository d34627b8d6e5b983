"""The bitsandbytes 4-bit CPU workaround, in one place.

bitsandbytes 0.50.2 has a silent bug on CPUs with AVX512-BF16 (this machine has it): the first
forward through a ``Linear4bit`` in eval mode without gradients (an evaluation pass) repacks the
weight into a CPU-only inference layout (``quant_state.packing_format_for_cpu``). Every later
forward, training included, then goes through ``gemv_4bit``, which has no backward: gradients
flowing through the frozen 4-bit base (to the LoRA weights of earlier layers) are dropped, with
only a warning ("autograd kernel was not registered"). QLoRA with periodic evaluation would
then silently train only the last layers' adapters.

The repack happens only when ``Linear4bit.support_avx512bf16_for_cpu`` is true, so we switch that
flag off on every 4-bit layer before any forward. Inside axolotl this runs as a plugin
(``plugins: [refinery.bnb_cpu.BnbCpuPlugin]`` in the generated axolotl.yaml) right after the model
is built and again after the LoRA adapters are attached. On a GPU the flag is never consulted,
so the plugin is harmless there. tests/test_bnb_cpu.py fails if the bug comes back.
"""

from __future__ import annotations

from typing import Any

PLUGIN = "refinery.bnb_cpu.BnbCpuPlugin"


def disable_cpu_repacking(model: Any) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` on the differentiable path; returns how many."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        state = getattr(layer.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            # too late: a forward already repacked it; training through it would lose gradients
            raise RuntimeError(f"{type(layer).__name__} was already repacked for CPU inference; "
                               "call disable_cpu_repacking before the first forward")
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


try:  # axolotl lives only in the trainer's environment (.venv-train)
    from axolotl.integrations.base import BasePlugin as _AxolotlPlugin
except ImportError:  # the main environment: the plugin is defined but never loaded there
    _AxolotlPlugin = object


class BnbCpuPlugin(_AxolotlPlugin):  # type: ignore[misc, valid-type]
    """axolotl plugin: apply :func:`disable_cpu_repacking` before the first forward."""

    def post_model_build(self, cfg: Any, model: Any) -> None:
        disable_cpu_repacking(model)

    def post_model_load(self, cfg: Any, model: Any) -> None:
        n = disable_cpu_repacking(model)
        print(f"refinery.bnb_cpu: CPU repacking disabled on {n} Linear4bit layers", flush=True)
