"""Tiny real models and real PEFT adapters on them, for tests and benchmarks."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
             tie_word_embeddings=False)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_char_tokenizer(out: Path) -> None:
    """A character-level tokenizer (102 tokens) with a chat template, for tiny models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def save_llama(out: Path, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**LLAMA, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                            **overrides})
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    save_char_tokenizer(out)
    return out


def save_gpt2(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def save_lora(base: Path, out: Path, seed: int = 1, **config) -> Path:
    """A PEFT LoRA on ``base`` with random (non-zero) A and B, so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config.setdefault("target_modules", ["q_proj", "v_proj"])
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # scale B up so the adapter visibly changes the output
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)
    peft_model.save_pretrained(out)
    _set_base_name(out, None)
    return out


def _set_base_name(out: Path, name: str | None) -> None:
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = name
    config_file.write_text(json.dumps(config, indent=2))


def save_bottleneck(out: Path, hidden: int, layers: int, m: int = 4, seed: int = 2) -> Path:
    """A zoo-format bottleneck adapter with random weights."""
    import torch
    from safetensors.torch import save_file

    from zoo.models.adapters import BOTTLENECK_FORMAT, BOTTLENECK_POSITIONS, bottleneck_key

    torch.manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for pos in BOTTLENECK_POSITIONS:
            tensors[bottleneck_key(i, pos, "down", "weight")] = torch.randn(m, hidden)
            tensors[bottleneck_key(i, pos, "down", "bias")] = torch.randn(m)
            tensors[bottleneck_key(i, pos, "up", "weight")] = torch.randn(hidden, m)
            tensors[bottleneck_key(i, pos, "up", "bias")] = torch.randn(hidden)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "zoo_adapter.json").write_text(json.dumps({
        "format": BOTTLENECK_FORMAT, "format_version": 1, "base_model": None,
        "hidden_size": hidden, "bottleneck_size": m, "non_linearity": "relu",
        "positions": list(BOTTLENECK_POSITIONS), "layers": list(range(layers))}))
    return out


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_lora(out: Path, base_dir: Path, rank: int = 8, seed: int = 0,
                      targets=ALL_PROJECTIONS, scale: float = 0.02, dtype=None) -> Path:
    """A PEFT-format LoRA with random A and B (fast: no model is loaded), in float32 or
    ``dtype``."""
    import torch
    from safetensors.torch import save_file

    from zoo.models.bases import module_weight_shapes

    shapes = module_weight_shapes(base_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, shape in sorted(shapes.items()):
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        out_f, in_f = shape
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=generator) * scale
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=generator) * scale
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
        "bias": "none", "base_model_name_or_path": None, "task_type": "CAUSAL_LM"}))
    return out


class Models:
    """Lazily built tiny models, shared by a whole test session."""

    def __init__(self, root: Path):
        self.root = root

    @cached_property
    def llama(self) -> Path:
        return save_llama(self.root / "tiny-llama")

    @cached_property
    def llama_servable(self) -> Path:
        """``llama`` with one attention head of 32, a width vLLM's CPU attention computes
        (``llama``'s are 8 wide: zoo serve refuses it before calibrating)."""
        return save_llama(self.root / "tiny-llama-servable", num_attention_heads=1,
                          num_key_value_heads=1)

    @cached_property
    def llama_wide(self) -> Path:
        """Same layout as ``llama`` but hidden size 48: adapters for it must not fit."""
        return save_llama(self.root / "tiny-llama-wide", hidden_size=48, intermediate_size=96)

    @cached_property
    def llama_blocks(self) -> Path:
        """``llama`` with every linear input a multiple of 64, bitsandbytes' NF4 block size,
        as in real models: its AVX-512 CPU kernels dequantize narrower layers wrongly."""
        return save_llama(self.root / "tiny-llama-blocks", hidden_size=64, intermediate_size=128)

    @cached_property
    def gpt2(self) -> Path:
        return save_gpt2(self.root / "tiny-gpt2")

    def lora(self, tag: str, base: Path | None = None, **config) -> Path:
        out = self.root / f"lora-{tag}"
        if not out.exists():
            save_lora(base or self.llama, out, **config)
        return out

    def bottleneck(self, tag: str = "b", m: int = 4) -> Path:
        out = self.root / f"bottleneck-{tag}"
        if not out.exists():
            save_bottleneck(out, LLAMA["hidden_size"], LLAMA["num_hidden_layers"], m=m)
        return out
