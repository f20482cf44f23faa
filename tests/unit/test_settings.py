"""One configuration path: a flag, else its VRM_* variable, else the config file, else the
default; a bad value is one sentence naming where it came from (config/settings.py)."""

import json

import pytest

from vramancer.cli import main


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    monkeypatch.setenv("VRM_CONFIG", str(path))
    monkeypatch.delenv("VRM_DEVICES", raising=False)
    monkeypatch.delenv("VRM_CONTEXT", raising=False)
    return path


def devices_listed(capsys, *args) -> list[str]:
    assert main(["devices", "--json", *args]) == 0
    return [d["name"] for d in json.loads(capsys.readouterr().out)["devices"]]


def test_flag_over_variable_over_file_over_default(config_file, capsys, monkeypatch):
    assert devices_listed(capsys, "--devices", "sim:2x1GiB") == ["sim0", "sim1"]
    config_file.write_text('devices = "sim:3x1GiB"\ncontext = 1024\n')
    assert devices_listed(capsys) == ["sim0", "sim1", "sim2"]
    assert devices_listed(capsys, "--devices", "sim:2x1GiB") == ["sim0", "sim1"]
    monkeypatch.setenv("VRM_DEVICES", "sim:4x1GiB")
    assert devices_listed(capsys) == ["sim0", "sim1", "sim2", "sim3"]

    assert main(["config", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config_file"] == str(config_file) and shown["config_file_exists"]
    assert shown["settings"]["devices"] == {"value": "sim:4x1GiB", "source": "VRM_DEVICES"}
    assert shown["settings"]["context"] == {"value": "1024", "source": str(config_file)}
    assert shown["settings"]["strategy"] == {"value": "proportional", "source": "default"}


@pytest.mark.parametrize("text, sentence", [
    ("devicez = 1\n", "has an unknown setting 'devicez'"),
    ("devices = [\n", "is not valid TOML"),
    ("context = \"lots\"\n", "'context' in {path} must be a whole number, not 'lots'."),
    ("[server]\nport = 1\n", "has an unknown setting 'server'"),
])
def test_a_bad_config_file_is_one_sentence_and_exit_2(config_file, capsys, text, sentence):
    config_file.write_text(text)
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vramancer: ") and sentence.format(path=config_file) in err
    assert err.count("\n") == 1 and "Traceback" not in err
