"""What a Hub repo holds, read from its listing before anything is downloaded.

A repo is one of: a PEFT adapter (``adapter_config.json`` and its weights, with or
without zoo's ``zoo.json``), a zoo bottleneck adapter (``zoo_adapter.json``), or a
transformers model (``config.json`` and safetensors weights, sharded or not, with its
tokenizer and chat template): a base, or a model zoo merged. Only the files zoo uses are
fetched (``training_args.bin``, optimizer states, other weight formats are not), each
is checked against the listing's own hash (the sha256 of an LFS object, the git blob id
of a small file), and the listing is pinned to one commit, so a repo that changes
between listing and download is refused, never half-registered.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from zoo.errors import FormatError, IntegrityError

RepoKind = Literal["adapter", "bottleneck", "model", "gguf"]
MANIFEST = "zoo.json"
CARD = "README.md"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
BOTTLENECK_CONFIG = "zoo_adapter.json"
MODEL_CONFIG = "config.json"
# a model's files beside its weights (what from_pretrained reads for model and tokenizer)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
               "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class Listing:
    """A repo at one commit: its files with their listed sizes and hashes."""

    repo: str
    commit: str
    files: dict[str, dict]  # path -> {"size", "blob_id", "sha256" (LFS objects only)}
    license: str | None = None

    @classmethod
    def from_info(cls, repo: str, info) -> Listing:
        files = {}
        for sibling in info.siblings or []:
            lfs = getattr(sibling, "lfs", None)
            files[sibling.rfilename] = {"size": sibling.size, "blob_id": sibling.blob_id,
                                        "sha256": getattr(lfs, "sha256", None) if lfs else None}
        card = getattr(info, "card_data", None)
        license_ = getattr(card, "license", None) if card is not None else None
        return cls(repo, info.sha, files, license_ if isinstance(license_, str) else None)


@dataclass(frozen=True)
class Plan:
    """What to fetch from a repo, and what it is."""

    kind: RepoKind
    files: list[str]
    manifest: bool  # it carries zoo's zoo.json


def plan_fetch(repo: str, names: set[str], gguf: str | None = None) -> Plan:
    """Tell the kind of a repo from its file names, and the files zoo needs of it
    (``gguf``: the GGUF file to build a base from, where the repo has several)."""
    if gguf is not None or (PEFT_CONFIG not in names and BOTTLENECK_CONFIG not in names and
                            not any(_SHARD.fullmatch(n) for n in names) and gguf_files(names)):
        return Plan("gguf", [pick_gguf(repo, names, gguf)], False)
    manifest = MANIFEST in names
    extra = [f for f in (CARD, MANIFEST) if f in names]
    if PEFT_CONFIG in names:
        weights = [f for f in (PEFT_WEIGHTS, PEFT_PICKLE) if f in names][:1]
        if not weights:
            raise FormatError(f"{repo} has {PEFT_CONFIG} but no {PEFT_WEIGHTS} (or "
                              f"{PEFT_PICKLE}); nothing was registered")
        return Plan("adapter", [PEFT_CONFIG, *weights, *extra], manifest)
    if BOTTLENECK_CONFIG in names:
        if PEFT_WEIGHTS not in names:
            raise FormatError(f"{repo} has {BOTTLENECK_CONFIG} but no {PEFT_WEIGHTS}")
        return Plan("bottleneck", [BOTTLENECK_CONFIG, PEFT_WEIGHTS, *extra], manifest)
    if MODEL_CONFIG in names:
        shards = sorted(n for n in names if _SHARD.fullmatch(n))
        if not shards:
            pickled = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth")))
            raise FormatError(
                f"{repo} is a model without safetensors weights"
                f"{' (it has ' + ', '.join(pickled[:3]) + ')' if pickled else ''}; nothing "
                "was registered", hint="zoo reads safetensors models: convert it "
                "(transformers: from_pretrained, then save_pretrained(safe_serialization=True)) "
                "and push or 'zoo add' the result.")
        return Plan("model", [*(f for f in MODEL_FILES if f in names), *shards, *extra],
                    manifest)
    folders = folders_holding(names)
    if folders:
        shown = ", ".join(folders[:6]) + (f" and {len(folders) - 6} more" if len(folders) > 6
                                          else "")
        raise FormatError(f"{repo} holds no adapter or model at its top, but in folders: "
                          f"{shown}; nothing was registered",
                          hint=f"Pull one with --subfolder {folders[0]} (or its address on "
                               f"the Hub, .../tree/REVISION/{folders[0]}).")
    shown = ", ".join(sorted(names - {".gitattributes"})[:6]) or "no files"
    raise FormatError(f"{repo} is neither an adapter nor a model ({shown}); nothing was "
                      "registered", hint=f"An adapter repo has {PEFT_CONFIG} (PEFT) or "
                      f"{BOTTLENECK_CONFIG} (zoo); a model repo has {MODEL_CONFIG} and "
                      "safetensors weights.")


def gguf_files(names: set[str]) -> list[str]:
    """The GGUF files at a repo's top that hold a whole model (not a vision projector, not
    one part of a split file)."""
    return sorted(n for n in names if n.lower().endswith(".gguf") and "/" not in n
                  and not n.lower().startswith("mmproj") and not _SPLIT_GGUF.search(n))


def pick_gguf(repo: str, names: set[str], wanted: str | None) -> str:
    """The GGUF file to build a base from: ``wanted``, or the repo's only one."""
    found = gguf_files(names)
    if wanted is not None and wanted in found:
        return wanted
    if wanted is not None:
        split = _SPLIT_GGUF.search(wanted) and wanted in names
        raise FormatError(
            f"{wanted} is {'one part of a split GGUF file' if split else 'not a GGUF file'} "
            f"of {repo}; nothing was registered", hint=(
                "transformers reads whole GGUF files only; pick another: "
                if split else "Pick one of: ") + (", ".join(found) or "(none)") + ".")
    if len(found) == 1:
        return found[0]
    raise FormatError(f"{repo} holds {len(found)} GGUF files: {', '.join(found)}; nothing "
                      "was registered", hint="Pick one with --gguf FILE: the base is built "
                      "from it, so the one closest to 16 bits (F16, BF16, then Q8_0) keeps "
                      "the model best.")


def folders_holding(names: set[str]) -> list[str]:
    """The folders of a repo with an adapter's or a model's config in them (a repo of
    several adapters, or of a run's checkpoints)."""
    configs = (PEFT_CONFIG, BOTTLENECK_CONFIG, MODEL_CONFIG)
    return sorted({folder for folder, _, file in (n.rpartition("/") for n in names)
                   if folder and file in configs})


def subfolder_of(text: str | None) -> str | None:
    """A folder of a repo as given (``a/b``, slashes around it dropped), checked: it must
    stay inside the repo. None: the repo's top."""
    if text is None or not text.strip("/"):
        return None
    folder = text.strip("/")
    parts = folder.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\\" in folder or \
            any(ord(c) < 32 for c in folder):
        raise FormatError(f"{text!r} is not a folder of a repo",
                          hint="Give its path in the repo, as the Hub shows it: "
                               "checkpoint-500, or adapters/french.")
    return folder


def hub_name(repo: str, subfolder: str | None = None) -> str:
    """The name a repo is registered under by default: its id, lowercased (Hub ids may
    have capitals; registry names do not), with the folder's path after a dash for one
    folder of it (``acme/runs`` folder ``checkpoint-500``: ``acme/runs-checkpoint-500``)."""
    name = repo.lower()
    if subfolder:
        name += "-" + re.sub(r"[^a-z0-9._-]+", "-", subfolder.lower()).strip("-")
    return name


def repo_label(repo: str, subfolder: str | None) -> str:
    """A repo, or one folder of it, as messages name it."""
    return f"{repo} (folder {subfolder})" if subfolder else repo


def in_folder(names: set[str], folder: str | None) -> set[str]:
    """A repo's file names under ``folder``, relative to it (None: every name)."""
    if folder is None:
        return names
    prefix = folder + "/"
    return {n[len(prefix):] for n in names if n.startswith(prefix)}


def git_blob_id(path: Path) -> str:
    """The git object id of a file (what the Hub lists for files outside LFS)."""
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_against_listing(listing: Listing, snapshot: Path, files: list[str],
                          sha256_of) -> None:
    """Every downloaded file is the one the listing described (``sha256_of(path)`` gives
    ``sha256:HEX``, through zoo's hash cache, so registering it later hashes nothing)."""
    changed = []
    for name in files:
        listed, path = listing.files[name], snapshot / name
        if listed["size"] is not None and path.stat().st_size != listed["size"]:
            changed.append(name)
        elif listed["sha256"]:
            if sha256_of(path) != f"sha256:{listed['sha256']}":
                changed.append(name)
        elif listed["blob_id"] and git_blob_id(path) != listed["blob_id"]:
            changed.append(name)
    if changed:
        raise IntegrityError(f"{listing.repo}: {', '.join(changed)} changed between listing "
                             f"and download (commit {listing.commit[:12]}); nothing was "
                             "registered", files=changed,
                             hint="Pull again; if it persists, the Hub serves other bytes "
                                  "than it lists.")


def pickled_to_safetensors(source: Path, target: Path) -> int:
    """Convert a PEFT ``adapter_model.bin`` to safetensors with PyTorch's weights-only
    loader: tensors are read, no pickled code ever runs. The number of tensors."""
    import pickle

    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
        raise FormatError(f"{source.name} is not a plain tensor file ({str(exc)[:200]}); "
                          "it was not loaded", path=str(source),
                          hint="Convert it where you trust it (PEFT: save_pretrained with "
                               "safe_serialization=True) and pull or add the result.") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FormatError(f"{source.name} holds something other than named tensors",
                          path=str(source))
    save_file({k: v.contiguous() for k, v in state.items()}, target)
    return len(state)
