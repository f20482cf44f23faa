"""The dependency range is a promise the suite keeps: pyproject.toml bounds torch, transformers,
textual and torchao on both sides, the versions installed are inside those bounds (at the lowest
under `make test-oldest`), and what VRAMancer relies on in transformers' cache classes is still
what transformers has. When a newer transformers changes it, these say what changed and where
VRAMancer decides about it, before any user's load meets it."""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import re

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.bounds import ROOT, declared, lowest


def installed(name: str) -> Version:
    return Version(importlib.metadata.version(name))


def test_every_tested_library_has_a_lower_and_an_upper_bound():
    for name, spec in declared().items():
        operators = {specifier.operator for specifier in SpecifierSet(spec)}
        assert ">=" in operators and operators & {"<", "<="}, (
            f"pyproject.toml gives {name} {spec!r}: a promise needs the lowest version the suite passed "
            f"on (>=) and a cap above the newest (<)")


def test_the_installed_libraries_are_inside_the_range_pyproject_promises():
    for name, spec in declared().items():
        version = installed(name)
        assert SpecifierSet(spec).contains(version, prereleases=True), (
            f"{name} {version} is installed, outside the range pyproject.toml promises ({spec}); "
            f"run `make test` and `make test-oldest` on it before moving the bound")


@pytest.mark.skipif(not os.environ.get("VRM_LOWEST_BOUNDS"), reason="only under `make test-oldest`")
def test_make_test_oldest_runs_at_the_lowest_bounds():
    for name, low in lowest().items():
        # torch's CPU build carries a local label (2.13.0+cpu): the release is what is promised
        assert installed(name).release == Version(low).release, (
            f"make test-oldest should run {name} {low}, its lower bound in pyproject.toml, "
            f"but {installed(name)} is installed")


def test_the_cpu_torch_make_setup_installs_is_inside_the_range():
    found = re.search(r"^CPU_TORCH\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile names no CPU_TORCH"
    assert SpecifierSet(declared()["torch"]).contains(found.group(1)), (
        f"make setup installs torch {found.group(1)} on CPU-only machines, outside pyproject.toml's "
        f"{declared()['torch']}")


# Cache layer kinds of transformers' DynamicCache that VRAMancer has looked at and refuses:
# indexed attention keeps a second set of keys (DeepSeek's indexer) that VRAMancer does not price.
REFUSED_KINDS = {"indexed_attention"}


def test_every_cache_kind_transformers_builds_is_split_or_refused_on_purpose():
    import transformers
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING

    from vramancer.model.architecture import (
        FULL_KINDS,
        NONE_KINDS,
        STATE_KINDS,
        WINDOW_KINDS,
    )

    split = set(FULL_KINDS + WINDOW_KINDS + STATE_KINDS + NONE_KINDS)
    theirs = set(DYNAMIC_LAYER_TYPE_MAPPING)
    new = sorted(theirs - split - REFUSED_KINDS)
    assert not new, (
        f"transformers {transformers.__version__} builds cache layers of kinds VRAMancer has not looked at: "
        f"{', '.join(new)}; decide in vramancer/model/architecture.py whether each is split (and how its "
        f"bytes are counted) or refused, and name it in this test")
    gone = sorted(split - theirs)
    assert not gone, (
        f"transformers {transformers.__version__} no longer builds cache layers of kinds "
        f"vramancer/model/architecture.py prices: {', '.join(gone)}; see what replaced them")


def test_layers_take_the_cache_by_the_name_vramancer_passes():
    """generation.py, fused_layer.py and the cluster's node hand each layer its cache as `cache=`:
    transformers 5.24 renamed it from past_key_values."""
    import transformers
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaForCausalLM,
    )

    for function in (LlamaForCausalLM.forward, LlamaDecoderLayer.forward):
        assert "cache" in inspect.signature(function).parameters, (
            f"transformers {transformers.__version__}'s {function.__qualname__} takes no `cache` argument, "
            f"which VRAMancer passes the KV cache as")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         vocab_size=64)
    cache = DynamicCache(config=config)
    assert len(getattr(cache, "layers", ())) == 3, (
        f"transformers {transformers.__version__}'s DynamicCache no longer holds one entry per layer in "
        f"`.layers`, where VRAMancer finds and moves each layer's cache")


def test_the_readme_states_the_range_pyproject_promises():
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Supported versions\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no 'Supported versions' section"
    for name, spec in declared().items():
        cap = re.search(r"<=?([0-9][0-9.]*)", spec).group(1)
        row = f"| {name} | {lowest()[name]} | {cap} |"
        assert row in section.group(1), f"README's 'Supported versions' lacks the row {row!r} for pyproject's {spec}"
