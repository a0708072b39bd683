"""zoo eval against transformers' own loss, and the calibrated W8A8 writer's choices."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tests.bounds import assert_within, forward_bound, gamma
from tests.factory import LLAMA
from tests.helpers import memory_left_behind, zoo, zoo_json
from zoo.apps.evaluate import evaluate, nll_transformers, sequences
from zoo.catalog.registry import Registry

TEXT = ("The lighthouse keeper climbed the stairs every evening. " * 6).strip()


@pytest.fixture
def tiny(models):
    zoo("add", models.llama, "--name", "tiny")
    return models


def hf_loss(model, ids, labels) -> float:
    """transformers' own mean cross-entropy (it shifts the labels itself)."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss)


def test_text_and_chat_losses_match_transformers(tiny, tmp_path, zoo_home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny.llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny.llama)
    text = tmp_path / "held.txt"
    text.write_text(TEXT)
    chat = tmp_path / "held.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]})
        for w in ("yes", "no", "maybe")))
    for data in (text, chat):
        seqs = sequences(tokenizer, data)
        total, count = nll_transformers(model, seqs)
        expected = [(hf_loss(model, ids, labels), sum(label >= 0 for label in labels[1:]))
                    for ids, labels in seqs]
        reference = sum(loss * n for loss, n in expected) / sum(n for _, n in expected)
        # two float32 sums of the same per-token losses, in another order
        assert abs(total / count - reference) <= gamma(count) * reference
        assert count == sum(n for _, n in expected)
    assert count < len(sum((ids for ids, _ in seqs), []))  # only the answers were scored


def test_eval_of_an_adapter_on_another_variant_is_recorded(tiny, tmp_path, zoo_home):
    zoo("quantize", "tiny", "--scheme", "nf4", "--no-eval")
    zoo("add", tiny.lora("plain"), "--name", "acme/q", "--base", "tiny@nf4")
    text = tmp_path / "held.txt"
    text.write_text(TEXT)
    trained = zoo("eval", "acme/q", "--data", text)
    assert "acme/q on nf4: loss" in trained.stdout and "(transformers)" in trained.stdout
    other = json.loads(zoo("eval", "acme/q", "--variant", "nf4", "--data", text, "--json").stdout)
    assert other["variant"] == "nf4" and other["tokens"] > 10
    # perplexity is written to 4 decimals, the loss to 5: exp of a value within 0.5e-5
    ppl = math.exp(other["loss"])
    assert abs(other["perplexity"] - ppl) <= ppl * math.expm1(0.5e-5) + 0.5e-4
    shown = zoo_json("show", "acme/q")["evaluations"]
    assert set(shown) == {"nf4"} and shown["nf4"]["data"] == "held.txt"
    result = zoo("eval", "acme/q", "--variant", "w8a8", "--data", text, ok=False)
    assert result.exit_code == 1 and "base variant" in result.stderr  # tiny has no w8a8


@pytest.mark.slow
def test_calibrated_w8a8_keeps_the_worst_layers_and_records_why(smollm2_w8a8_home):
    """The calibrated writer on the real base (the variant zoo serve made): smoothing lowers
    the worst int8 error, the layers kept in 16 bits are whole vLLM layers, the weights
    have the width this CPU's int8 kernel computes exactly, and the checkpoint says so."""
    from safetensors.torch import load_file

    from zoo.quantize.w8a8 import LEVELS, weight_bits

    home = smollm2_w8a8_home
    variant = Registry(home).load().base("smollm2-135m-instruct").variants["w8a8"]
    q = variant.quantization
    assert q["calibrated"] and q["method"] == "smoothquant"
    assert q["worst_int8_error"] < q["worst_int8_error_before_smoothing"]
    assert q["weight_bits"] == weight_bits() and not q["weight_bits_asked"]
    weights = {}
    for shard in (home / variant.path).glob("*.safetensors"):
        weights |= {k: t for k, t in load_file(shard).items() if t.dtype == torch.int8}
    assert len(weights) == q["quantized_modules"]
    assert max(int(t.abs().max()) for t in weights.values()) == LEVELS[q["weight_bits"]]
    config = json.loads((home / variant.path / "config.json").read_text())["quantization_config"]
    ignored = set(config["ignore"])
    assert "lm_head" in ignored
    for layer in q["kept_16bit"]:
        assert layer.endswith(("qkv", "gate_up", "o_proj", "down_proj"))
        parent, _, leaf = layer.rpartition(".")
        parts = {"qkv": ["q_proj", "k_proj", "v_proj"], "gate_up": ["gate_proj", "up_proj"]}
        assert {f"{parent}.{p}" for p in parts.get(leaf, [leaf])} <= ignored


@pytest.mark.vllm
def test_served_loss_matches_transformers_on_the_real_base(smollm2_home, tmp_path):
    from tests.conftest import linked_home
    from zoo.catalog.loading import load_model, load_tokenizer

    home = linked_home(smollm2_home, tmp_path / "home")
    registry = Registry(home)
    served = evaluate("smollm2-135m-instruct", "original", registry=registry)
    base = registry.load().base("smollm2-135m-instruct")
    model = load_model(registry, base)
    tokenizer = load_tokenizer(home / base.path)
    from zoo.models.data import HELDOUT_TEXT

    seqs = sequences(tokenizer, HELDOUT_TEXT)
    total, count = nll_transformers(model, seqs)
    assert served.engine == "vllm" and served.tokens == count
    # the engine computes in the activation dtype zoo chose for this CPU; the bound is how
    # far that dtype moves transformers' own loss (the reference computed twice, in float32
    # and in that dtype), twice over, plus the recorded loss's rounding
    from tests.bounds import reported_loss_bound
    from zoo.serve.launch import activation_dtype

    dtype = activation_dtype()
    moved = 0.0
    if dtype != "float32":
        low = load_model(registry, base, dtype={"bfloat16": "bf16", "float16": "fp16"}[dtype])
        low_total, _ = nll_transformers(low, seqs)
        moved = abs(low_total - total) / count
    bound = 2 * moved + reported_loss_bound(total / count, count, 5)
    assert abs(served.loss - total / count) <= bound, (served.loss, total / count, bound)


def test_adapters_adapted_to_the_smoothed_base_compute_what_they_did_on_the_original(
        models, tmp_path):
    """SmoothQuant changes what LoRA layers read and write; the rescaled adapter on the
    smoothed base gives the original adapter's outputs on the original base (PEFT on both),
    and the unadapted one does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.factory import ALL_PROJECTIONS, write_random_lora
    from zoo.models.smoothing import adapt_lora, load_scales, save_scales
    from zoo.quantize import smooth

    lora = write_random_lora(tmp_path / "lora", models.llama, rank=4, seed=3, scale=0.3,
                             targets=ALL_PROJECTIONS)
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))

    def load():
        return AutoModelForCausalLM.from_pretrained(models.llama, dtype=torch.float32).eval()

    def logits(model, adapter):
        with torch.no_grad():
            return PeftModel.from_pretrained(model, adapter).eval()(input_ids=ids).logits

    smoothed = load()
    # outlier channels, as real models have, so that the scales are far from 1
    smoothed.model.layers[0].input_layernorm.weight.data[:4] *= 30
    reference = load()
    reference.model.layers[0].input_layernorm.weight.data[:4] *= 30
    expected = logits(reference, lora)
    scales = smooth.smooth_llama(smoothed, smooth.calibrate(smoothed, [ids]), alpha=0.8)
    assert max(float(s.max() / s.min()) for s in scales.values()) > 2
    save_scales(tmp_path, scales, smoothed.config)
    adapted = adapt_lora(lora, load_scales(tmp_path), tmp_path / "adapted")
    smoothed_again = load()
    smoothed_again.model.layers[0].input_layernorm.weight.data[:4] *= 30
    smooth.smooth_llama(smoothed_again, smooth.calibrate(smoothed_again, [ids]), alpha=0.8)
    got = logits(smoothed_again, adapted)
    # the rescaled weights equal the originals up to float32 rounding of one scale each
    bound = forward_bound(float(expected.abs().max()), 64 + 4, layers=2)
    assert_within(got, expected, bound, "adapted adapter on the smoothed base")
    stale = logits(smoothed, lora)
    assert (stale - expected).abs().max() > 100 * (got - expected).abs().max()


def test_adapting_adapters_keeps_nothing_behind(models, tmp_path):
    """The API server adapts every new adapter of its life to the smoothed base: reading
    the files must leave nothing behind (safetensors 0.8.0's default mmap reader keeps two
    Python objects per tensor read, for good: 800 KB over 400 adapters here, growing with
    every one; what stays now is first-use caches, under 60 KB however many)."""
    import shutil

    from tests.factory import ALL_PROJECTIONS, write_random_lora
    from zoo.models.smoothing import adapt_lora, load_scales, save_scales

    lora = write_random_lora(tmp_path / "lora", models.llama, rank=4, targets=ALL_PROJECTIONS)
    config = json.loads((models.llama / "config.json").read_text())
    shapes = {"attn_in": config["hidden_size"], "mlp_in": config["hidden_size"],
              "down_in": config["intermediate_size"],
              "v_out": config["num_key_value_heads"] * config["hidden_size"]
              // config["num_attention_heads"]}
    save_scales(tmp_path, {f"layers.{i}.{k}": torch.ones(n) for i in range(
        config["num_hidden_layers"]) for k, n in shapes.items()},
        SimpleNamespace(**config))

    def adapt(times: int) -> None:
        for i in range(times):
            adapt_lora(lora, load_scales(tmp_path), tmp_path / f"adapted-{i % 2}")
            shutil.rmtree(tmp_path / f"adapted-{i % 2}")

    adapt(30)  # first-use allocations (imports, caches)
    grown = memory_left_behind(lambda: adapt(400))
    tensors = 2 * 7 * config["num_hidden_layers"] + len(shapes) * config["num_hidden_layers"]
    assert grown < 400 * tensors * 28 / 2, grown  # under one small object per two tensors


def test_the_server_hands_vllm_adapted_copies_on_a_smoothed_base(models, tmp_path, zoo_home,
                                                                   monkeypatch):
    from zoo.models.smoothing import SCALES_FILE
    from zoo.serve.policy import ServePolicy

    zoo("add", models.llama, "--name", "tiny")
    zoo("add", models.lora("plain"), "--name", "acme/a", "--base", "tiny")
    registry = Registry(zoo_home)
    entry = registry.load().adapter("acme/a")
    stored = zoo_home / entry.path
    plain = ServePolicy(registry, "tiny", 16, model_dir=zoo_home / "bases/tiny")
    assert plain.lora_path("acme/a", stored, entry.content_hash) == stored
    smoothed_dir = tmp_path / "smoothed"
    smoothed_dir.mkdir()
    from zoo.models.smoothing import save_scales

    config = registry.load().base("tiny")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(models.llama)
    scales = {}
    for i in range(config.num_layers):
        scales[f"layers.{i}.attn_in"] = torch.full((cfg.hidden_size,), 2.0)
        scales[f"layers.{i}.mlp_in"] = torch.full((cfg.hidden_size,), 2.0)
        scales[f"layers.{i}.v_out"] = torch.full((cfg.num_key_value_heads * 8,), 2.0)
        scales[f"layers.{i}.down_in"] = torch.full((cfg.intermediate_size,), 2.0)
    save_scales(smoothed_dir, scales, cfg)
    assert (smoothed_dir / SCALES_FILE).exists()
    policy = ServePolicy(registry, "tiny", 16, model_dir=smoothed_dir)
    path = policy.lora_path("acme/a", stored, entry.content_hash)
    assert path != stored and (path / "adapter_model.safetensors").exists()
    assert policy.lora_path("acme/a", stored, entry.content_hash) == path  # made once
    from safetensors.torch import load_file

    before = load_file(stored / "adapter_model.safetensors")
    after = load_file(path / "adapter_model.safetensors")
    key = next(k for k in before if "q_proj.lora_A" in k)
    torch.testing.assert_close(after[key], before[key] * 2)

    # zoo serve's engine rescales as it loads instead (plugin.SMOOTHED_LORA): the same
    # numbers vLLM would read from the copy, to the bit
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    from zoo.serve import adapter_reading, plugin
    from zoo.serve.policy import MODEL_VARIABLE

    def loaded(folder):
        model = LoRAModel.from_lora_tensors(
            lora_model_id=1, tensors=load_file(folder / "adapter_model.safetensors"),
            peft_helper=PEFTHelper.from_local_dir(str(folder), None), device="cpu",
            dtype=torch.bfloat16)
        return {name: (w.lora_a, w.lora_b) for name, w in model.loras.items()}

    from_copy = loaded(path)
    monkeypatch.setattr(LoRAModel, "from_lora_tensors", LoRAModel.from_lora_tensors)
    monkeypatch.setattr(adapter_reading, "_RESCALE", {})  # the scales it sets there
    monkeypatch.setenv(MODEL_VARIABLE, str(smoothed_dir))
    assert plugin.SMOOTHED_LORA in plugin.zoo_patches()
    assert plugin.install([plugin.SMOOTHED_LORA]).applied == ["smoothed_lora"]
    from_stored = loaded(stored)
    assert from_stored.keys() == from_copy.keys() and from_copy
    for name, (a, b) in from_copy.items():
        assert torch.equal(from_stored[name][0], a) and torch.equal(from_stored[name][1], b)
    assert not torch.equal(loaded(path)[name][0], a)  # the copy, rescaled again: not equal


def test_gptq_rounding_beats_nearest_on_the_calibration_inputs():
    """GPTQ's integers, on the same per-row scale, give a smaller output error on the
    inputs its Hessian came from than rounding each weight to the nearest step."""
    from zoo.quantize.gptq import quantize_rows

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 96, generator=g)
    x = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)  # correlated
    ints, scale = quantize_rows(weight, x.T @ x)
    assert ints.abs().max() <= 127 and torch.equal(ints, ints.round())
    nearest = torch.round(weight / scale).clamp(-127, 127) * scale
    exact = x @ weight.T
    gptq_error = (x @ (ints * scale).T - exact).norm()
    nearest_error = (x @ nearest.T - exact).norm()
    assert gptq_error < 0.8 * nearest_error, (gptq_error, nearest_error)
    # damping pulls H towards a multiple of the identity, where moving an error onto the
    # other columns gains nothing: overwhelming damping is rounding to the nearest step
    damped, _scale = quantize_rows(weight, x.T @ x, damping=1e9)
    torch.testing.assert_close(damped * scale, nearest)
    # 7-bit weights (CPUs whose int8 kernel saturates 8-bit ones): the same, on 63 steps
    ints7, scale7 = quantize_rows(weight, x.T @ x, levels=63)
    assert ints7.abs().max() == 63 and torch.allclose(scale7, scale * 127 / 63)
    nearest7 = torch.round(weight / scale7).clamp(-63, 63) * scale7
    assert (x @ (ints7 * scale7).T - exact).norm() < 0.8 * (x @ nearest7.T - exact).norm()


def test_a_bottleneck_adapter_is_evaluated_through_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    zoo("add", tiny.bottleneck(), "--name", "acme/bn", "--base", "tiny")
    text = tmp_path / "held.txt"
    text.write_text(TEXT)
    result = json.loads(zoo("eval", "acme/bn", "--data", text, "--json").stdout)
    base = json.loads(zoo("eval", "tiny", "--variant", "nf4", "--data", text, "--json",
                          ok=False).stdout or "{}")
    assert result["engine"] == "transformers" and result["variant"] == "original"
    assert base == {}  # tiny has no nf4 variant: refused, nothing made
    # recomputed with a Houlsby forward written from the formula and transformers' own loss
    from transformers import AutoTokenizer

    from tests.bounds import reported_loss_bound
    from tests.helpers import houlsby_forward

    model = houlsby_forward(tiny.llama, tiny.bottleneck())
    # tiny takes 128 tokens at once: windows of 127 (an engine adds the token it answers)
    window = LLAMA["max_position_embeddings"] - 1
    seqs = sequences(AutoTokenizer.from_pretrained(tiny.llama), text, window)
    losses = [(hf_loss(model, ids, labels), sum(label >= 0 for label in labels[1:]))
              for ids, labels in seqs]
    tokens = sum(n for _, n in losses)
    reference = sum(loss * n for loss, n in losses) / tokens
    assert result["tokens"] == tokens
    assert abs(result["loss"] - reference) <= reported_loss_bound(reference, tokens, 5), \
        (result["loss"], reference)
    plain = AutoModelForCausalLM.from_pretrained(tiny.llama, dtype=torch.float32)
    without = sum(hf_loss(plain, ids, labels) * n for (ids, labels), (_, n) in
                  zip(seqs, losses, strict=True)) / tokens
    assert abs(without - reference) > reported_loss_bound(reference, tokens, 5)  # it matters


def test_the_held_out_domains_are_never_calibrated_on():
    """Every domain the issue names ships, each long enough to measure (two windows of the
    real base's tokenizer would need the base; a thousand words of text is the floor
    here), and no paragraph of them is in what the int8 calibration reads."""
    from zoo.apps.evaluate import held_out_domains
    from zoo.models.data import calibration_texts, texts_of

    domains = held_out_domains()
    assert set(domains) == {"zoo", "prose", "dialogue", "code", "formal", "technical",
                            "spanish"}
    calibration = "\n\n".join(calibration_texts())
    for domain, path in domains.items():
        paragraphs = texts_of(path)
        assert sum(len(p) for p in paragraphs) >= 2500, domain
        assert not [p for p in paragraphs if p in calibration], domain
    code = texts_of(domains["code"])
    assert any(p.startswith("    ") for p in code)  # paragraphs keep their indentation


def test_a_quantized_base_is_compared_with_its_original_on_every_domain(tiny, tmp_path,
                                                                        zoo_home):
    """zoo eval --domains: each held-out text's perplexity on the NF4 variant over the
    original's, checked against transformers' own loss on both models (the NF4 one loaded
    by transformers from the variant's directory, computing with bitsandbytes' own
    dequantization on zoo's portable path), worst first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoo.apps.evaluate import held_out_domains
    from zoo.models.nf4 import load_nf4

    made = zoo("quantize", "tiny", "--scheme", "nf4").stdout  # and measured on every domain
    rows = json.loads(zoo("eval", "tiny", "--variant", "nf4", "--domains", "--json").stdout)
    assert sorted(r["domain"] for r in rows) == sorted(held_out_domains())
    assert [r["ratio"] for r in rows] == sorted((r["ratio"] for r in rows), reverse=True)
    nf4_dir = zoo_home / Registry(zoo_home).load().base("tiny").variants["nf4"].path
    tokenizer = AutoTokenizer.from_pretrained(tiny.llama)
    models = {"original": AutoModelForCausalLM.from_pretrained(tiny.llama,
                                                               dtype=torch.float32).eval(),
              "variant": load_nf4(nf4_dir)}
    window = LLAMA["max_position_embeddings"] - 1  # what tiny takes at once, less one
    for row in (rows[0], rows[-1]):  # the worst and the best
        seqs = sequences(tokenizer, held_out_domains()[row["domain"]], window)
        for which, model in models.items():
            losses = [(hf_loss(model, ids, labels), len(ids) - 1) for ids, labels in seqs]
            count = sum(n for _, n in losses)
            reference = math.exp(sum(loss * n for loss, n in losses) / count)
            # the same float32 sums in another order, and 4 decimals in the JSON
            assert abs(row[which] - reference) <= gamma(count) * count * reference + 1e-4, \
                (row["domain"], which, row[which], reference)
        assert row["tokens"] == count
    assert len({r["ratio"] for r in rows}) > 1  # measured, not one number for all
    assert f"worst: {rows[0]['domain']}, x{rows[0]['ratio']:.3f}" in made


def test_eval_of_a_variant_reports_its_ratio_to_the_original(tiny, tmp_path, zoo_home):
    zoo("quantize", "tiny", "--scheme", "nf4", "--no-eval")
    text = tmp_path / "held.txt"
    text.write_text(TEXT)
    cheap = json.loads(zoo("eval", "tiny", "--variant", "nf4", "--data", text, "--json").stdout)
    full = zoo_json("show", "tiny")["evaluations"]["original"]  # measured for the ratio
    assert full["data_sha256"] == cheap["data_sha256"] and full["engine"] == "transformers"
    assert abs(cheap["ratio"] - cheap["perplexity"] / full["perplexity"]) <= 1e-3
    again = zoo("eval", "tiny", "--variant", "nf4", "--data", text).stdout
    assert f"x{cheap['ratio']:.3f} the original's perplexity" in again
    assert zoo_json("show", "tiny")["evaluations"]["original"]["at"] == full["at"]  # reused
    refused = zoo("eval", "tiny", "--domains", ok=False)
    assert refused.exit_code == 2 and "--variant nf4 or w8a8" in refused.stderr


@pytest.mark.parametrize("content", [b"\n\n  \n", b"\xff\xfe not text"])
def test_calibration_text_zoo_cannot_use_is_refused_before_the_model_loads(
        tiny, tmp_path, zoo_home, monkeypatch, content):
    """An empty file failed after the model loaded with an error to report (max() of
    nothing); text that is not UTF-8 was read after the model loaded."""
    import transformers

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded first")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    path = tmp_path / "calibration.txt"
    path.write_bytes(content)
    result = zoo("quantize", "tiny", "--scheme", "w8a8", "--calibration", path, "--no-eval",
                 ok=False)
    assert result.exit_code == 1 and "calibration.txt" in result.stderr
    assert "w8a8" not in zoo_json("show", "tiny")["variants"]


def test_a_server_refusing_a_sequence_is_zoos_error_with_its_message():
    """The served scorer ended in "unexpected HTTPError: HTTP Error 400" without the
    server's reason; now it is one line of zoo's error with it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from zoo.apps.evaluate import nll_served
    from zoo.errors import ServeError

    class Refusing(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the handler's protocol
            body = json.dumps({"error": {"message": "This model's maximum context length\n"
                                                    "is 128 tokens", "code": 400}}).encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        with pytest.raises(ServeError) as refused:
            nll_served(url, "acme/a:v1", [([1, 2, 3], [-100, 2, 3])])
    finally:
        server.shutdown()
    assert "refused to score 3 tokens with 'acme/a:v1' (HTTP 400)" in refused.value.message
    assert "maximum context length is 128 tokens" in refused.value.message
