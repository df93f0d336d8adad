"""Pipeline specs: built-ins by name, paths, overrides, one-line errors naming the key."""
import pytest

from soundlake.core.config import parse_override
from soundlake.core.errors import UserError
from soundlake.pipelines.spec import builtin_names, load_spec


def test_builtins_load_by_name():
    assert {"demo", "local"} <= set(builtin_names())
    demo = load_spec("demo")
    assert demo.source.kind == "synth" and demo.segment.window == 10.0


def test_path_and_overrides(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nsource: {kind: local, input: /x}\nsegment: {sample_rate: 48000}\n")
    spec = load_spec(str(p), sets=["segment.sample_rate=16000", "segment.channels=2", "ray.num_cpus=1"])
    assert (spec.segment.sample_rate, spec.segment.channels, spec.ray.num_cpus) == (16000, 2, 1)
    assert spec.source.input == "/x"


@pytest.mark.parametrize("sets, words", [
    (["segment.sampel_rate=16000"], ["segment.sampel_rate", "unknown key"]),
    (["segment.sample_rate=abc"], ["segment.sample_rate", "integer", "abc"]),
    (["segment.policy=middle"], ["segment.policy", "middle"]),
    (["segment.window=-1"], ["segment.window", "greater than 0"]),
    (["nosuch=1"], ["nosuch", "unknown key"]),
])
def test_bad_settings_are_one_line_naming_the_key(sets, words):
    with pytest.raises(UserError) as e:
        load_spec("demo", sets=sets)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_local_needs_input_and_unknown_pipeline():
    with pytest.raises(UserError, match="source.input"):
        load_spec("local")
    with pytest.raises(UserError, match="demo"):
        load_spec("no-such-pipeline")


def test_bad_yaml_and_override_syntax(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_spec(str(p))
    with pytest.raises(UserError, match="key=value"):
        parse_override("segment.sample_rate")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
