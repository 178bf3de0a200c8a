"""Policy file: validation messages, example files, JSON schema, CLI, hot reload."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from lenpred.router import registry
from lenpred.router.cli import main as router_cli
from lenpred.router.config import (PolicyError, PolicyWatcher, default_policy_path, load_policy, parse_policy,
                                   policy_json_schema, schema_text)
from lenpred.router.interfaces import Role

ROUTER_DIR = Path(__file__).resolve().parents[1] / "router"
POLICIES = sorted(glob.glob(str(ROUTER_DIR / "policies" / "*.yaml")))

GOOD = """
apiVersion: lenpred.io/v1alpha1
kind: RouterPolicy
plugins:
  - name: kv
    type: predicted-kv-admitter
    parameters: {quantile: 0.9, headroom: 0.9}
  - name: srpt
    type: predicted-srpt-orderer
    parameters: {aging_seconds: 20}
  - name: future-load
    type: predicted-load-scorer
  - name: prefix
    type: prefix-affinity-scorer
profiles:
  default:
    admission: kv
    ordering: srpt
    scorers: [{ref: future-load, weight: 2}, {ref: prefix, weight: 1}]
    picker: max-score
"""


def problems(text: str) -> str:
    with pytest.raises(PolicyError) as e:
        parse_policy(yaml.safe_load(text), "p.yaml")
    return str(e.value)


def test_design_example_compiles_with_normalised_weights():
    policy = parse_policy(yaml.safe_load(GOOD))
    prof = policy.default
    assert prof.admitter.type_name == "predicted-kv-admitter" and prof.admitter.params.headroom == 0.9
    assert prof.orderer.params.aging_seconds == 20 and prof.orderer.params.quantile == 0.5  # default kept
    assert [(s.name, w) for s, w in prof.scorers] == [("future-load", pytest.approx(2 / 3)),
                                                     ("prefix", pytest.approx(1 / 3))]
    assert prof.picker.type_name == "max-score-picker"  # a type name without its suffix, default params


@pytest.mark.parametrize("path", POLICIES, ids=os.path.basename)
def test_example_policies_are_valid_and_match_the_schema(path):
    load_policy(path)
    jsonschema.validate(yaml.safe_load(Path(path).read_text()), policy_json_schema())


def test_default_policy_is_packaged():
    assert load_policy(default_policy_path()).profiles


def test_schema_file_is_current():
    assert (ROUTER_DIR / "policy.schema.json").read_text() == schema_text(), \
        "regenerate: lenpred router schema > router/policy.schema.json"


def test_schema_rejects_parameter_typos():
    doc = yaml.safe_load(GOOD)
    doc["plugins"][0]["parameters"]["headrom"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, policy_json_schema())


def test_registry_names_are_kebab_case_with_role_suffix():
    for name, cls in registry.types().items():
        assert name.endswith("-" + cls.role.value) and name == name.lower()
    assert set(registry.types(Role.PICKER)) == {"max-score-picker", "weighted-random-picker"}
    with pytest.raises(ValueError, match="must be kebab-case"):
        registry.register("FooScorer", registry.lookup("least-load-scorer"))


def test_bad_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("apiVersion: x\nplugins:\n  - name: a\n   type: b\n")
    with pytest.raises(PolicyError, match=r"bad.yaml:\n  - invalid YAML at line 4, column \d+"):
        load_policy(p)


UNREADABLE = [
    (b"apiVersion: lenpred.io/v1alpha1\nkind: RouterPolicy\nprofiles: {default: {}}\n# caf\xe9\n",
     r"not UTF-8 text: byte 0xe9 at line 4"),
    (b"a: " + b"[" * 5000 + b"]" * 5000, r"invalid YAML"),
    (b"x" * (2 << 20), r"a policy file is at most"),
]


@pytest.mark.parametrize("data,says", UNREADABLE, ids=["not UTF-8", "nested too deep", "too large"])
def test_unreadable_files_give_the_usual_clear_message(tmp_path, capsys, data, says):
    p = tmp_path / "bad.yaml"
    p.write_bytes(data)
    with pytest.raises(PolicyError, match=says):
        load_policy(p)
    assert router_cli(["validate", str(p)]) == 1 and "invalid router policy" in capsys.readouterr().err


def test_unknown_type_suggests_the_closest():
    msg = problems(GOOD.replace("type: predicted-kv-admitter", "type: predicted-kv-admiter"))
    assert "plugins[0] ('kv').type: unknown plugin type 'predicted-kv-admiter'" in msg
    assert "did you mean 'predicted-kv-admitter'" in msg
    assert "admission" not in msg  # the broken instance is reported once, not again at each reference


def test_bad_parameters_name_the_field():
    msg = problems(GOOD.replace("{quantile: 0.9, headroom: 0.9}", "{quantile: 1.5, headrom: 0.9}"))
    assert "plugins[0] ('kv').parameters.quantile: Input should be less than or equal to 0.99" in msg
    assert "plugins[0] ('kv').parameters.headrom: Extra inputs are not permitted" in msg


def test_unknown_and_wrong_role_references():
    msg = problems(GOOD.replace("{ref: prefix, weight: 1}", "{ref: nope, weight: 1}")
                   .replace("picker: max-score", "picker: srpt"))
    assert "profiles.default.scorers[1]: 'nope' is neither a plugin name" in msg
    assert "profiles.default.picker: 'srpt' is a predicted-srpt-orderer, not a picker" in msg


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(apiVersion="v2"), "apiVersion: Input should be 'lenpred.io/v1alpha1'"),
    (lambda d: d.update(profiles={"fast": d["profiles"]["default"]}), "a profile named 'default' is required"),
    (lambda d: d["plugins"].append(dict(d["plugins"][0])), "plugins[4] ('kv'): duplicate plugin name"),
    (lambda d: d["profiles"]["default"].update(scorer=[]), "profiles.default.scorer: Extra inputs"),
    (lambda d: d.update(queue={"max_wait_s": -1}), "queue.max_wait_s: Input should be greater than 0"),
])
def test_structure_errors(edit, expected):
    doc = yaml.safe_load(GOOD)
    edit(doc)
    assert expected in problems(yaml.safe_dump(doc))


def test_cli_validate(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(GOOD.replace("aging_seconds", "aging_secs"))
    assert router_cli(["validate", str(good)]) == 0
    assert router_cli(["validate", str(bad)]) == 1
    assert "parameters.aging_secs: Extra inputs are not permitted" in capsys.readouterr().err
    assert router_cli(["validate", str(tmp_path / "missing.yaml")]) == 1
    assert router_cli(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "PolicyFile"


def test_hot_reload_keeps_last_good(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    watcher = PolicyWatcher(str(path))
    assert watcher.check() is None  # unchanged

    def rewrite(text: str) -> None:
        st = path.stat()
        path.write_text(text)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # distinct mtime, however fast

    rewrite(GOOD.replace("aging_seconds: 20", "aging_seconds: 5"))
    assert watcher.check() is True and watcher.policy.default.orderer.params.aging_seconds == 5
    rewrite("plugins: [\n")
    assert watcher.check() is False
    assert watcher.policy.default.orderer.params.aging_seconds == 5 and "invalid YAML" in watcher.last_error
    rewrite(GOOD)
    assert watcher.check() is True and watcher.last_error is None


def test_readme_documents_every_plugin_type_and_parameter():
    readme = (ROUTER_DIR / "README.md").read_text()
    for type_name, cls in registry.types().items():
        assert f"### {type_name}\n" in readme, f"router/README.md lacks a stanza for {type_name}"
        stanza = readme.split(f"### {type_name}\n", 1)[1].split("\n### ", 1)[0]
        for param in cls.Parameters.model_fields:
            assert f"`{param}`" in stanza, f"{type_name}: parameter {param} undocumented"
