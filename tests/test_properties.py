"""Property tests of what users and Hubs send: every input is either accepted as valid or
refused with zoo's own error (one line for the user), never a crash or a hang.

The number of generated cases per property is EXAMPLES (the README reports it).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.factory import LLAMA
from tests.helpers import zoo
from zoo.catalog.home import MAX_NAME_LENGTH, split_variant, validate_name
from zoo.catalog.registry import Catalog, read_catalog
from zoo.core.files import read_safetensors_header
from zoo.errors import FormatError, InvalidName, RegistryError, ZooError
from zoo.hub.cards import read_manifest
from zoo.models.adapters import inspect_bottleneck, inspect_lora
from zoo.models.bases import describe_model
from zoo.serve.launch import ServeOptions, plan_serve
from zoo.serve.policy import load_tenants

EXAMPLES = 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
NAME_SPEC = re.compile(r"[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)?")
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


@FUZZ
@given(st.text(max_size=120) | st.from_regex(NAME_SPEC, fullmatch=True))
def test_names_are_exactly_the_documented_ones(name):
    valid = bool(NAME_SPEC.fullmatch(name)) and len(name) <= MAX_NAME_LENGTH and \
        ".." not in name.split("/") and "." not in name.split("/")
    try:
        assert validate_name(name) == name
        assert valid, name
        assert "\n" not in name and not name.startswith("/")
    except InvalidName:
        assert not valid, name


@FUZZ
@given(st.text(max_size=40))
def test_variant_refs_parse_or_are_refused(ref):
    try:
        name, variant = split_variant(ref)
    except InvalidName:
        return
    assert validate_name(name) == name
    assert variant is None or re.fullmatch(r"[a-z0-9][a-z0-9._-]*", variant)


@FUZZ
@given(header=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()),
       length=st.none() | st.integers(min_value=0, max_value=2**64 - 1),
       tail=st.binary(max_size=64))
def test_safetensors_headers_parse_or_are_format_errors(tmp_path, header, length, tail):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + tail)
    try:
        table = read_safetensors_header(path)
    except FormatError:
        return
    assert isinstance(table, dict)
    for info in table.values():
        start, end = info["data_offsets"]
        assert 0 <= start <= end <= path.stat().st_size


@FUZZ
@given(JSON)
def test_registry_files_load_or_are_registry_errors(tmp_path, data):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(data))
    try:
        catalog = read_catalog(path)
    except RegistryError:
        return
    assert isinstance(catalog, Catalog)
    for name in catalog.entries:  # touching an entry is where a malformed one is found
        try:
            catalog.entries[name]
        except RegistryError:
            pass


@FUZZ
@given(JSON | st.fixed_dictionaries({"tenants": st.dictionaries(
    st.text(max_size=8), st.fixed_dictionaries({"keys": JSON, "adapters": JSON}), max_size=3)}))
def test_keys_files_load_or_are_format_errors(tmp_path, data):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data))
    try:
        tenants = load_tenants(path)
    except FormatError:
        return
    for tenant in tenants:
        assert tenant.keys and all(isinstance(k, str) and len(k) >= 8 for k in tenant.keys)
        assert all(isinstance(p, str) for p in tenant.adapters)


@pytest.fixture(scope="module")
def lora_files(models):
    path = models.lora("plain")
    config = json.loads((path / "adapter_config.json").read_text())
    from zoo.models.bases import module_weight_shapes

    return path, config, module_weight_shapes(models.llama)


CONFIG_FIELDS = st.dictionaries(
    st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
                     "use_dora", "fan_in_fan_out", "bias", "peft_type", "modules_to_save",
                     "target_modules"]),
    JSON | st.dictionaries(st.text(max_size=30), st.integers() | st.text(max_size=4),
                           max_size=3),
    max_size=4)


@FUZZ
@given(CONFIG_FIELDS)
# found by CI: int(Infinity) raised OverflowError, not zoo's error
@example({"r": float("inf")})
@example({"lora_alpha": 10 ** 400})
@example({"rank_pattern": {"q_proj": float("-inf")}})
def test_adapter_configs_inspect_or_are_refused(lora_files, tmp_path_factory, changes):
    path, config, base = lora_files
    folder = tmp_path_factory.mktemp("fuzz-lora")
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    (folder / "adapter_model.safetensors").symlink_to(path / "adapter_model.safetensors")
    try:
        found = inspect_lora(folder, base, "tiny")
    except ZooError:
        return
    assert found.rank >= 1 and found.details.max_rank >= found.rank


def test_a_lora_whose_config_disagrees_with_its_weights_is_refused_for_that(lora_files,
                                                                          tmp_path):
    """A config's rank other than its weights': a FormatError that says so, not a
    ShapeMismatch, which tells the user to pass another base (as a bottleneck's size:
    the example above)."""
    path, config, base = lora_files
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] + 1}))
    (tmp_path / "adapter_model.safetensors").symlink_to(path / "adapter_model.safetensors")
    with pytest.raises(FormatError, match="the config's rank needs"):
        inspect_lora(tmp_path, base, "tiny")


BASE_FIELDS = st.dictionaries(
    st.sampled_from(["architectures", "hidden_size", "n_embd", "num_hidden_layers", "vocab_size",
                     "text_config", "dtype", "torch_dtype", "model_type", "tie_word_embeddings"]),
    JSON | st.integers(min_value=-2, max_value=4096) | st.lists(st.text(max_size=8), max_size=2),
    max_size=3)


@FUZZ
@given(BASE_FIELDS)
# each crashed `zoo add` or was stored in the registry as it came
@example({"text_config": [1]})
@example({"architectures": [{"a": 1}]})
@example({"hidden_size": -5})
@example({"tie_word_embeddings": "no"})
def test_base_configs_describe_or_are_refused(models, tmp_path_factory, changes):
    """A base's config.json from anywhere (a Hub's): its facts are of the registry's types,
    or zoo refuses it with its own error."""
    folder = tmp_path_factory.mktemp("fuzz-base")
    config = json.loads((models.llama / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    for weights in models.llama.glob("*.safetensors"):
        (folder / weights.name).symlink_to(weights)
    try:
        facts = describe_model(folder)
    except FormatError:
        return
    assert isinstance(facts.architecture, str) and isinstance(facts.model_type, str)
    assert isinstance(facts.dtype, str) and isinstance(facts.tie_word_embeddings, bool)
    for size in (facts.hidden_size, facts.num_layers, facts.vocab_size):
        assert type(size) is int and size >= 1


BOTTLENECK_FIELDS = st.dictionaries(
    st.sampled_from(["format_version", "bottleneck_size", "non_linearity", "positions",
                     "layers"]),
    JSON | st.lists(st.integers(min_value=-1, max_value=2) | st.booleans(), max_size=3)
    | st.lists(st.sampled_from(["attention", "feed_forward", "output"]), max_size=3)
    | st.sampled_from(["relu", "gelu", "swish"]), max_size=3)


@FUZZ
@given(BOTTLENECK_FIELDS)
# each was registered as it came (str() of any value as its nonlinearity, a load that
# failed later; a format this zoo does not know)
@example({"non_linearity": {"a": 1}})
@example({"non_linearity": "swish"})
@example({"format_version": 2})
@example({"bottleneck_size": 1})  # ShapeMismatch: blamed the base for the config's size
def test_bottleneck_configs_inspect_or_are_refused(models, tmp_path_factory, changes):
    from zoo.models.adapters import BOTTLENECK_ACTIVATIONS, BOTTLENECK_POSITIONS

    source = models.bottleneck()
    folder = tmp_path_factory.mktemp("fuzz-bottleneck")
    config = json.loads((source / "zoo_adapter.json").read_text())
    (folder / "zoo_adapter.json").write_text(json.dumps({**config, **changes}))
    for weights in source.glob("*.safetensors"):
        (folder / weights.name).symlink_to(weights)
    try:
        found = inspect_bottleneck(folder, LLAMA["hidden_size"], LLAMA["num_hidden_layers"], "tiny")
    except FormatError:
        return
    details = found.details
    assert changes.get("format_version", 1) == 1
    assert details.non_linearity in BOTTLENECK_ACTIVATIONS
    assert sorted(set(details.positions)) == sorted(details.positions)
    assert set(details.positions) <= set(BOTTLENECK_POSITIONS)
    assert details.modules == found.trainable_params // (
        2 * details.bottleneck_size * LLAMA["hidden_size"] + LLAMA["hidden_size"]
        + details.bottleneck_size)


CHAT_LINES = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "tool"]),
    "content": st.text(max_size=6) | JSON}), max_size=3)}) | st.fixed_dictionaries(
    {"prompt": st.text(max_size=6) | JSON, "completion": st.text(max_size=6) | JSON})


@FUZZ
@given(st.lists(st.binary(max_size=40) | (JSON | CHAT_LINES).map(lambda v: json.dumps(v).encode()),
                max_size=4),
       st.booleans())
@example([b'{"prompt": "a", "completion": "\xff"}'], False)  # crashed: UnicodeDecodeError
@example([b'{"prompt": "a", "completion": "b"}'], True)  # a BOM, as Windows' editors write
def test_training_data_loads_or_is_refused(tmp_path, lines, bom):
    from zoo.models.data import load_dataset

    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" * bom + b"\n".join(lines))
    try:
        dataset = load_dataset(path)
    except ZooError:
        return
    for item in dataset.examples:
        assert item.messages and item.messages[-1]["role"] == "assistant"
        assert all(isinstance(m["content"], str) for m in item.messages)


@FUZZ
@given(JSON | st.fixed_dictionaries({"entry": JSON, "files": JSON}))
def test_hub_manifests_parse_or_are_refused(tmp_path, data):
    path = tmp_path / "zoo.json"
    path.write_text(json.dumps(data))
    try:
        manifest = read_manifest(Path(path), "evil/repo")
    except ZooError:
        return
    assert validate_name(manifest.base) == manifest.base
    assert manifest.training is None or all(isinstance(k, str) for k in manifest.training)


@pytest.mark.parametrize("kind, field, value", [
    ("base", "hidden_size", float("inf")), ("base", "vocab_size", float("-inf")),
    ("bottleneck", "bottleneck_size", float("inf")), ("bottleneck", "layers", [float("inf")])])
def test_numbers_past_pythons_conversions_are_refused(models, tmp_path, kind, field, value):
    """JSON's Infinity (which Python's json reads) makes int() raise OverflowError."""
    source = models.llama if kind == "base" else models.bottleneck()
    folder = shutil.copytree(source, tmp_path / kind)
    config = folder / ("config.json" if kind == "base" else "zoo_adapter.json")
    config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
    with pytest.raises(FormatError):
        if kind == "base":
            describe_model(folder)
        else:
            inspect_bottleneck(folder, LLAMA["hidden_size"], LLAMA["num_hidden_layers"], "tiny")


@pytest.fixture(scope="module")
def nf4_parts():
    """bitsandbytes' own NF4 parts of one weight, with and without double quantization,
    and its own dequantization of each."""
    import bitsandbytes.functional as F
    import torch

    weight = torch.randn(6, 100, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    made = {}
    for nested in (True, False):
        packed, state = F.quantize_4bit(weight, quant_type="nf4", blocksize=64,
                                        compress_statistics=nested)
        parts = {f"w.{k}": v for k, v in state.as_dict(packed=True).items()}
        state_json = json.loads(bytes(parts.pop("w." + "quant_state.bitsandbytes__nf4").tolist()))
        made[nested] = ({"w": packed, **parts}, state_json, F.dequantize_4bit(packed, state))
    return made


NF4_FIELDS = st.sampled_from(["quant_type", "shape", "dtype", "blocksize", "nested_blocksize",
                              "nested_offset"])
NF4_PARTS = st.sampled_from(["w", "w.quant_map", "w.absmax", "w.nested_quant_map",
                             "w.nested_absmax"])
FLOAT_JSON = JSON | st.floats() | st.lists(st.integers(min_value=-3, max_value=700), max_size=3)


@FUZZ
@given(nested=st.booleans(),
       fields=st.dictionaries(NF4_FIELDS, FLOAT_JSON | st.just("drop"), max_size=2),
       parts=st.dictionaries(NF4_PARTS, st.sampled_from(
           ["drop", "short", "long", "float32", "uint8", "bfloat16"]), max_size=2))
@example(nested=True, fields={"blocksize": 0}, parts={})
@example(nested=True, fields={"nested_offset": None}, parts={})
@example(nested=False, fields={"shape": [7, 100]}, parts={})
@example(nested=True, fields={}, parts={"w.nested_absmax": "short"})
def test_nf4_quant_states_dequantize_or_are_refused(nf4_parts, tmp_path_factory, nested, fields,
                                                    parts):
    """A base's NF4 weight (a QLoRA base from anywhere) with any quant state and any parts:
    dequantized to its stated shape and dtype, or refused with zoo's error before a merge
    writes anything (`state_of` reads only headers). Untouched, bitsandbytes' own values."""
    import torch
    from safetensors.torch import save_file

    from zoo.merge.nf4 import STATE_SUFFIX, dequantize_from, state_of
    from zoo.merge.tensors import TensorSource

    tensors, state, expected = nf4_parts[nested]
    tensors, state = dict(tensors), dict(state)
    for field, value in fields.items():
        state.pop(field, None) if value == "drop" else state.__setitem__(field, value)
    for name, change in parts.items():
        if name not in tensors or change == "drop":
            tensors.pop(name, None)
            continue
        value = tensors[name]
        tensors[name] = {"short": value.reshape(-1)[:-1], "long": torch.cat([value.reshape(-1)] * 2),
                         }.get(change, value.to(getattr(torch, change)))
    tensors["w" + STATE_SUFFIX] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    folder = tmp_path_factory.mktemp("nf4")
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    source = TensorSource(folder)
    try:
        stated = state_of(source, "w")
    except FormatError:
        return
    value = dequantize_from(source, "w")
    assert tuple(value.shape) == stated.shape and value.dtype == stated.dtype
    if not fields and not parts:
        assert torch.equal(value, expected)


LONG_NUMBER = "1" * 5000  # Python's json refuses integers of over 4,300 digits (ValueError)


@pytest.mark.parametrize("what", ["registry", "adapter config", "keys file", "training data"])
def test_a_number_too_long_for_pythons_json_is_refused(lora_files, tmp_path, what):
    """json.loads raises a plain ValueError, not JSONDecodeError, for such a number."""
    from zoo.models.data import load_dataset

    path, _, base = lora_files
    if what == "adapter config":
        folder = shutil.copytree(path, tmp_path / "adapter")
        (folder / "adapter_config.json").write_text(f'{{"r": {LONG_NUMBER}}}')
        read, error = (lambda: inspect_lora(folder, base, "tiny")), FormatError
    else:
        file = tmp_path / "file.json"
        file.write_text({"registry": f'{{"schema_version": {LONG_NUMBER}}}',
                         "keys file": f'{{"tenants": {LONG_NUMBER}}}',
                         "training data": f'{{"prompt": "a", "completion": {LONG_NUMBER}}}\n',
                         }[what])
        read, error = {"registry": (lambda: read_catalog(file), RegistryError),
                       "keys file": (lambda: load_tenants(file), FormatError),
                       "training data": (lambda: load_dataset(file), ZooError)}[what]
    with pytest.raises(error):
        read()


@pytest.fixture(scope="module")
def edited_home(models, tmp_path_factory):
    """A home with a base and an adapter of two versions, and its registry's text."""
    home = tmp_path_factory.mktemp("edited-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZOO_HOME", str(home))
        zoo("add", models.llama, "--name", "tiny-llama")
        zoo("add", models.lora("plain"), "--name", "x", "--base", "tiny-llama")
        zoo("add", models.lora("second", r=2, lora_alpha=4, seed=9), "--name", "x",
            "--base", "tiny-llama", "--new-version")
        zoo("alias", "x:v2", "beta")
    registry = json.loads((home / "registry.json").read_text())
    evaluation = {"data": "heldout.txt", "data_sha256": "sha256:" + "0" * 64, "tokens": 100,
                  "loss": 2.5, "perplexity": 12.18, "engine": "transformers",
                  "at": "2026-12-05T00:00:00Z"}  # the optional fields too, to be edited
    for entry in registry["entries"].values():
        entry["evaluations"] = {"original": evaluation}
    registry["entries"]["x"]["canary"] = {"version": 2, "percent": 10.0}
    registry["entries"]["x"]["history"] = [{"at": "2026-12-05T00:00:00Z", "action": "promote",
                                            "version": 1, "from": 2}]
    (home / "registry.json").write_text(json.dumps(registry))
    return home, (home / "registry.json").read_text()


def _fields(node, prefix: tuple = ()) -> list[tuple]:
    """Every field of a stored entry, nested ones and list items too, as key paths."""
    found = []
    for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
        found.append((*prefix, key))
        if isinstance(value, dict | list) and value:
            found.extend(_fields(value, (*prefix, key)))
    return found


DELETE = object()


@FUZZ
@given(data=st.data())
@example(data=None)
def test_hand_edited_registries_work_or_get_zoos_error(edited_home, monkeypatch, data):
    """One field anywhere in a registry changed to any JSON value (or removed): each command
    that reads it works, or says which entry is malformed, in one line."""
    home, text = edited_home
    monkeypatch.setenv("ZOO_HOME", str(home))
    registry = json.loads(text)
    fields = [(name, *path) for name, entry in registry["entries"].items()
              for path in _fields(entry)]
    if data is None:  # the edit that once crashed `zoo list`
        where, value = ("x", "servable"), "yes"
    else:
        where = data.draw(st.sampled_from(fields))
        value = data.draw(JSON | st.just(DELETE))
    *parents, key = where
    node = registry["entries"]
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    edited = json.dumps(registry)
    (home / "registry.json").write_text(edited)
    try:
        for args in (["list"], ["list", "--json"], ["show", "x", "--json"], ["show", "x:v2"],
                     ["show", "tiny-llama"], ["versions", "x"], ["verify"]):
            result = zoo(*args, ok=False)
            assert result.exit_code in (0, 1), (args, where, value, result.output)
            if result.exit_code == 1 and args == ["verify"] and not result.stderr:
                assert "CHANGED" in result.stdout  # a hash edited: the files no longer match
            elif result.exit_code == 1:
                assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
                assert "unexpected" not in result.stderr, (args, where, value, result.stderr)
        from zoo.catalog.registry import Registry
        from zoo.serve.policy import ServePolicy
        from zoo.ui import pages

        anyone = pages.Viewer(None, None)  # a server's pages and its policy, as a server reads
        assert "Catalog" in pages.catalog_page(Registry(home), anyone, [])
        for name in ("x", "x:v2", "tiny-llama"):
            pages.entry_page(Registry(home), name, anyone, [])
        policy = ServePolicy(Registry(home), "tiny-llama", 16)
        policy.served_versions()
        for ref in ("x", "x:v2", "x:beta"):
            assert policy.adapter(ref).status in (200, 400, 404, 422, 500)
        # what `zoo serve` decides before it starts vLLM (it writes nothing): only the base
        # (or an adapter that became one) can keep it from starting; an adapter it cannot
        # serve is left out, and it says why
        try:
            plan = plan_serve(ServeOptions(quantization="none"), Registry(home))
        except ZooError:
            assert where[0] == "tiny-llama" or where == ("x", "kind"), (where, value)
        else:
            assert {a.name for a in plan.adapters} | {n for n, _ in plan.left_out} <= {"x"}
        assert (home / "registry.json").read_text() == edited
    finally:
        (home / "registry.json").write_text(text)
