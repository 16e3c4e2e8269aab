"""Concept banks on disk: tensors in ``concept_bank.safetensors``, metadata in
``concept_bank.json`` next to it.

The JSON records what the bank depends on (model spec and weight hash, layer, a hash of the
reference images' contents, patch geometry, the non-negativity transform) and a SHA-256 of the
tensors, so a corrupt or edited bank is detected on load and a bank made with another model,
layer or data set is refused by :func:`check_compatible`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vital.cache import atomic_write, tensors_digest, write_json

FORMAT = "vital-concept-bank"
VERSION = 1
FILE_NAME = "concept_bank.safetensors"
TENSORS = {   # name -> what it holds (K concepts, M patches, C' non-negative channels)
    "directions": "(K, C') NMF components: one concept direction per row",
    "coefficients": "(M, K) non-negative coefficient of every concept in every patch",
    "boxes": "(M, 4) patch boxes (image, top, left, side) in the canvas-size references",
    "top_patches": "(K, T) patch indices with the largest coefficients, best first",
    "importance": "(K,) contribution of each concept to the output (see meta 'ranking')",
}


class BankError(ValueError):
    """A bank that cannot be read: missing, corrupt or of an unknown format."""


class BankMismatch(ValueError):
    """A bank made with another model, layer or data set than the current run."""


@dataclass
class ConceptBank:
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def directions(self) -> torch.Tensor:
        return self.tensors["directions"]

    @property
    def n_concepts(self) -> int:
        return int(self.directions.shape[0])

    def order(self) -> list[int]:
        """Concept indices, most important first."""
        return self.tensors["importance"].argsort(descending=True).tolist()


def bank_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(tensors, metadata) files for a bank given as its folder, .safetensors or .json file."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    path = path.with_suffix(".safetensors")
    return path, path.with_suffix(".json")


def save_bank(bank: ConceptBank, path: str | os.PathLike) -> Path:
    """Write the bank atomically (temp files + rename); returns the .safetensors path."""
    missing = sorted(set(TENSORS) - set(bank.tensors))
    if missing:
        raise ValueError(f"a concept bank needs the tensors {missing} too; it has "
                         f"{sorted(bank.tensors)}")
    tensor_path, meta_path = bank_paths(path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in bank.tensors.items()}
    meta = {**bank.meta, "format": FORMAT, "version": VERSION,
            "sha256": tensors_digest(tensors), "tensors": TENSORS}
    atomic_write(tensor_path, lambda tmp: save_file(tensors, str(tmp)))
    write_json(meta_path, meta)
    return tensor_path


def load_bank(path: str | os.PathLike) -> ConceptBank:
    """Read a bank and verify its content hash; any problem raises :class:`BankError`."""
    tensor_path, meta_path = bank_paths(path)
    for needed in (tensor_path, meta_path):
        if not needed.is_file():
            raise BankError(f"concept bank file {needed} does not exist; a bank is the pair "
                            f"{FILE_NAME} + .json written by concept_neurons_fvis.py")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
    except (OSError, json.JSONDecodeError, SafetensorError) as err:
        raise BankError(f"concept bank {tensor_path} cannot be read ({err})") from None
    if meta.get("format") != FORMAT:
        raise BankError(f"{meta_path} is not a concept bank (format {meta.get('format')!r}, "
                        f"expected {FORMAT!r})")
    if tensors_digest(tensors) != meta.get("sha256"):
        raise BankError(f"concept bank {tensor_path} is corrupt: its tensors do not match the "
                        f"SHA-256 in {meta_path.name}; extract it again")
    missing = sorted(set(TENSORS) - set(tensors))
    if missing:
        raise BankError(f"concept bank {tensor_path} lacks the tensors {missing}")
    return ConceptBank(tensors, meta)


def check_compatible(meta: dict, *, weight_hash: str, model: str, layer: str,
                     dataset_hash: str) -> None:
    """Refuse a bank made with other weights, another layer or other reference images."""
    problems = []
    if meta.get("weight_hash") != weight_hash:
        problems.append(f"model: the bank was made with {meta.get('model')!r} (weights "
                        f"{str(meta.get('weight_hash'))[:12]}), this run uses {model!r} "
                        f"(weights {str(weight_hash)[:12]})")
    if meta.get("layer") != layer:
        problems.append(f"layer: the bank is at {meta.get('layer')!r}, --target_layer is "
                        f"{layer!r}")
    if meta.get("dataset_hash") != dataset_hash:
        problems.append(f"data set: the bank was made from other reference images "
                        f"({meta.get('ref_dir')!r}, {len(meta.get('files', []))} files, hash "
                        f"{str(meta.get('dataset_hash'))[:12]}; these hash to {dataset_hash[:12]})")
    if problems:
        raise BankMismatch("the concept bank does not fit this run: " + "; ".join(problems))
