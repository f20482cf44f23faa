"""Device specs, as a user types them, and the byte ledger simulated devices enforce."""

import pytest

from vramancer.config.device_spec import DeviceSpecError, parse_device_spec
from vramancer.config.errors import VramancerError
from vramancer.config.units import GiB, MiB, format_bytes, parse_size
from vramancer.platforms.devices import DeviceFullError, resolve_devices


def names_and_caps(text):
    return [(r.name, r.cap) for r in parse_device_spec(text).requests]


def test_simulated_pools():
    assert names_and_caps("sim:3x2GiB") == [("sim0", 2 * GiB), ("sim1", 2 * GiB), ("sim2", 2 * GiB)]
    assert names_and_caps("sim:4GiB,2GiB,1GiB") == [("sim0", 4 * GiB), ("sim1", 2 * GiB), ("sim2", GiB)]
    assert names_and_caps("sim:2x1GiB,512MiB") == [("sim0", GiB), ("sim1", GiB), ("sim2", 512 * MiB)]


def test_explicit_lists_with_caps():
    assert names_and_caps("cuda:0=10GiB,cpu") == [("cuda:0", 10 * GiB), ("cpu", None)]
    assert names_and_caps("cuda,cpu=8GiB") == [("cuda:0", None), ("cpu", 8 * GiB)]
    assert parse_device_spec("auto").auto


@pytest.mark.parametrize(
    "spec, words",
    [
        ("sim:0x", "at least one device"),
        ("sim:0x1GiB", "at least one device"),
        ("sim:-1GiB", "must be positive"),
        ("sim:2xlots", "not a size"),
        ("gpu0", "not a device"),
        ("cpu,cpu", "listed twice"),
        ("cuda:0=0GiB", "must be positive"),
    ],
)
def test_malformed_specs_say_why(spec, words):
    with pytest.raises(DeviceSpecError if "size" not in words and "positive" not in words else VramancerError) as err:
        parse_device_spec(spec)
    assert words in str(err.value)
    assert str(err.value).endswith(".")


def test_missing_cuda_device_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceSpecError, match="cuda:9 is not available"):
        resolve_devices(parse_device_spec("cuda:9"))


def test_auto_without_accelerators_falls_back_to_two_simulated_devices():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has an accelerator")
    devices = resolve_devices(parse_device_spec("auto"), simulated_size=300 * MiB)
    assert [(d.name, d.simulated, d.cap) for d in devices] == [("sim0", True, 300 * MiB), ("sim1", True, 300 * MiB)]


def test_simulated_device_accounts_bytes_and_refuses_past_capacity():
    (device,) = resolve_devices(parse_device_spec("sim:100MiB"))
    device.ledger.set("weights", 60 * MiB)
    device.ledger.set("kv", 30 * MiB)
    assert device.read().free == 10 * MiB
    with pytest.raises(DeviceFullError, match="capacity is 100 MiB"):
        device.ledger.set("workspace", 20 * MiB)
    # A refused claim changes nothing.
    assert device.read().free == 10 * MiB
    assert device.ledger.claims["workspace"] == 0


def test_cpu_reports_real_memory():
    (cpu,) = resolve_devices(parse_device_spec("cpu"))
    reading = cpu.read()
    assert 0 < reading.free <= reading.total
    assert reading.temperature is None  # psutil gives no CPU temperature here: None, not a guess


def test_sizes_parse_and_format_in_one_place():
    assert parse_size("1.5GiB") == int(1.5 * GiB)
    assert parse_size("512MiB") == 512 * MiB
    assert parse_size("1GB") == 10**9
    assert format_bytes(1.9 * GiB) == "1.9 GiB"
    assert format_bytes(210 * MiB) == "210 MiB"
