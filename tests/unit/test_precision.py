"""The rule for what is computed (planning/precision.py): the compute dtype follows what the
machine is — device kinds, CPU flags, whether our kernels are available — never a timing. The
CPU flags are injected, so every CPU kind's row runs on any machine."""

import pytest
import torch

from vramancer.planning.precision import auto_dtype

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize("flags", [AVX2, AVX512, AVX512_BF16, AMX, frozenset()],
                         ids=["AVX2", "AVX512", "AVX512_BF16", "AMX", "unknown"])
def test_the_dtype_rule_for_every_cpu_kind(flags):
    for kinds in ({"cpu"}, {"sim"}, {"cpu", "sim"}):
        # Native weights: float32 on every CPU, kernels or not.
        assert auto_dtype(kinds, "native", True, flags).name == "float32"
        assert auto_dtype(kinds, "native", False, flags).name == "float32"
        for weights in ("q8", "q4"):
            # Quantized: our kernels take float32; without them ("no kernels") torchao's take bfloat16.
            assert auto_dtype(kinds, weights, True, flags).name == "float32"
            assert auto_dtype(kinds, weights, False, flags).name == "bfloat16"
    assert auto_dtype({"cuda", "cpu"}, "native", False, flags, cuda_bf16=True).name == "bfloat16"
    assert auto_dtype({"cuda", "cpu"}, "native", False, flags, cuda_bf16=False).name == "float16"
    assert auto_dtype({"mps", "cpu"}, "native", False, flags).name == "float16"
    assert auto_dtype({"cuda"}, "q8", False, flags).name == "bfloat16"


def test_the_reason_names_the_cpu():
    assert "AMX+AVX512_BF16 here" in auto_dtype({"sim"}, "native", True, AMX).reason
    assert "AVX2 here" in auto_dtype({"sim"}, "native", True, AVX2).reason


def test_no_timing_feeds_the_choice(tiny_model_dir, monkeypatch):
    """The choice is made without timing anything: a clock that fails stops nothing."""
    import time

    from vramancer.engine.loader import choose_dtype

    def no_clock():
        raise AssertionError("the dtype choice read a clock")

    monkeypatch.setattr(time, "perf_counter", no_clock)
    assert choose_dtype("auto", "native", {"sim"})[0] == torch.float32
    assert choose_dtype("bfloat16", "native", {"sim"}) == (torch.bfloat16, "bfloat16: as asked")


def test_without_our_kernels_torchao_runs_in_bfloat16_and_plan_says_so(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from vramancer.engine.loader import choose_dtype
    from vramancer.kernels.cpu import build as cpu_kernels
    from vramancer.quantization.weights import kernel_path, quantize_model

    if cpu_kernels.kernels() is not None:
        assert choose_dtype("auto", "q4", {"sim"})[0] == torch.float32
        assert "VRAMancer's AVX2 CPU kernels" in kernel_path("q4", torch.float32)
    monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    monkeypatch.setattr(cpu_kernels, "_reason", "this CPU lacks AVX2/FMA (torch reports DEFAULT)")
    assert choose_dtype("auto", "q4", {"sim"})[0] == torch.bfloat16
    assert kernel_path("q4", torch.float32) == "q4 weights: torchao/torch kernels (this CPU lacks AVX2/FMA (torch reports DEFAULT))"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    quantize_model(model, "q4")
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "Int4OpaqueTensor"
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_kernels_turned_off_by_the_environment_say_so(monkeypatch):
    from vramancer.kernels.cpu import build as cpu_kernels

    monkeypatch.setenv("VRM_CPU_KERNELS", "off")
    cpu_kernels.kernels.cache_clear()
    try:
        assert cpu_kernels.kernels() is None
        assert cpu_kernels.unavailable_reason() == "turned off by VRM_CPU_KERNELS=off"
    finally:
        monkeypatch.delenv("VRM_CPU_KERNELS")
        cpu_kernels.kernels.cache_clear()

