"""Reading a published checkpoint whole, in one process: for export and generate.

- `resolve_checkpoint`: a run directory, a checkpoint root or a checkpoint directory ->
  the checkpoint to read and the run it belongs to.
- `run_tokenizer`, `trimmed_vocab`: the run's tokenizer, and the vocabulary rows that mean
  something (a padded vocabulary's extra rows are dropped on export).
- `CheckpointReader`: full (tp-gathered) tensors by our logical names, from any tensor,
  pipeline and ZeRO layout (0-3), one pipeline item's files memory-mapped at a time.
  Which file holds what is launcher/checkpoint/ds_files.py's business.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import yaml

from launcher.checkpoint.ds_files import (
    item_key,
    layer_files,
    load_mmap,
    model_states_file,
    module_weights,
    optim_files,
    optimizer_state,
    param_shapes,
    saved_name,
    zero3_flat_groups,
    zero3_model_states_file,
    zero3_partition_count,
)
from launcher.checkpoint.state import LauncherState
from launcher.checkpoint.store import (
    MANIFEST,
    STATE,
    published,
    read_manifest,
    verify_files,
)
from launcher.config.coerce import model_config
from launcher.config.schema import ModelConfig
from launcher.errors import ConfigError, one_line
from launcher.formats.tokenizer import BYTE, load_tokenizer
from launcher.model import weights as hf_names
from parallel.costs import pipeline_items

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What reading a file whose bytes are not what DeepSpeed wrote raises from inside the state
# dicts (torch.load's own failures are caught whole: its unpickler can raise almost anything).
_NOT_WHAT_WAS_SAVED = (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError)

# --------------------------------------------------------------------------------------
# Finding the checkpoint and the run it belongs to
# --------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def resolve_checkpoint(path: Path) -> tuple[Path, Optional[Path]]:
    """(checkpoint directory, run directory or None), verified as a resume verifies it (every
    file in its manifest present, of its size and checksum). A run directory or checkpoint
    root gives its newest published checkpoint that verifies. ConfigError('--checkpoint', ...)
    naming the damaged file, or saying what `path` is not."""
    if not path.exists():
        raise ConfigError("--checkpoint", f"{path}: does not exist")
    if (path / STATE).is_file():
        if not (path / MANIFEST).is_file():
            raise ConfigError("--checkpoint", f"{path}: no {MANIFEST} (an incomplete save); export a published one")
        _verify(path)
        run = path.parent.parent
        return path, run if (run / "config.yaml").is_file() else None
    if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        root = path / "checkpoints"
        ckpt_dir = (_read_yaml(path / "config.yaml").get("checkpoint") or {}).get("dir")
        if ckpt_dir:
            root = Path(ckpt_dir)
        return _newest_verified(root, f"{path}: a run directory with no published checkpoint under {root}"), path
    if published(path):  # a checkpoint root (checkpoint.dir)
        run = path.parent
        return _newest_verified(path, f"{path}: no published checkpoint"), run if (run / "config.yaml").is_file() \
            else None
    raise ConfigError("--checkpoint", f"{path}: not a checkpoint (no {STATE}) nor a run directory (no config.yaml, "
                      "no checkpoints/); pass runs/NAME or runs/NAME/checkpoints/step-NNNNNNNN")


class _ShapeMismatch(ValueError):
    pass


def damaged(path: Path, what: str) -> ConfigError:
    """The one line for a file that passed verification (or has no manifest entry) but cannot
    be read as what it should be."""
    return ConfigError("--checkpoint", f"{path}: {what}: the checkpoint is damaged; give another one (a run "
                       "directory gives its newest one that verifies)")


def _why(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"unreadable ({type(err).__name__}{': ' + one_line(first)[:160] if first else ''})"


@contextmanager
def _reading(paths: list[Path]):
    """Errors from inside state dicts that are not DeepSpeed's (a file swapped for another,
    rewritten, or a manifest written over damaged files) as one line naming the file(s)."""
    try:
        yield
    except _NOT_WHAT_WAS_SAVED as err:
        what = str(err) if isinstance(err, _ShapeMismatch) else _why(err)
        if len(paths) == 1:
            raise damaged(paths[0], what) from None
        raise damaged(paths[0].parent, f"{what} in {', '.join(p.name for p in paths)}") from None


def _load(path: Path) -> dict:
    try:
        loaded = load_mmap(path)
    except Exception as err:  # noqa: BLE001 - whatever torch.load makes of bytes that are not a checkpoint
        raise damaged(path, _why(err)) from None
    if not isinstance(loaded, dict):
        raise damaged(path, f"holds a {type(loaded).__name__}, not a state dict")
    return loaded


def _read_state(ckpt: Path) -> tuple[LauncherState, ModelConfig]:
    try:
        state = LauncherState.read(ckpt)
        values = state.fingerprint["model"]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise damaged(ckpt / STATE, _why(err)) from None
    try:
        return state, model_config(values, "model")
    except ConfigError as err:
        raise damaged(ckpt / STATE, str(err)) from None


def _verify(ckpt: Path) -> None:
    entries, problem = read_manifest(ckpt)
    problem = problem or verify_files(ckpt, entries)
    if problem:
        raise ConfigError("--checkpoint", f"{problem}: the checkpoint is damaged; give another one (a run directory "
                          "gives its newest one that verifies)")


def _newest_verified(root: Path, none_message: str) -> Path:
    first_problem = None
    for ckpt in published(root):  # newest first
        missing = [ckpt / name for name in (MANIFEST, STATE) if not (ckpt / name).is_file()]
        if missing:  # an incomplete save, or a damaged one: said when no other verifies
            first_problem = first_problem or damaged(missing[0], "missing")
            continue
        try:
            _verify(ckpt)
            return ckpt
        except ConfigError as err:
            first_problem = first_problem or err
    raise first_problem or ConfigError("--checkpoint", none_message)


def run_tokenizer(run: Optional[Path], state: LauncherState):
    """The run's tokenizer (launcher.formats.tokenizer) when its config.yaml names one that
    loads and matches the checkpoint's fingerprint; else None (no vocabulary trim, no files
    copied)."""
    if state.fingerprint.get("data.tokenizer") == BYTE:  # its fingerprint names it: no file needed
        return load_tokenizer(BYTE)
    if run is None:
        return None

    data = _read_yaml(run / "config.yaml").get("data") or {}
    spec = data.get("tokenizer")
    if not spec:
        return None
    try:
        tok = load_tokenizer(str(spec), data.get("eod_token"))
    except ConfigError:
        return None
    saved = state.fingerprint.get("data.tokenizer")
    return tok if saved in (None, tok.sha256) else None


def trimmed_vocab(model: ModelConfig, state: LauncherState, tok) -> int:
    """The vocabulary rows that mean something: a run started from model.init_from keeps that
    model's vocab_size; else the tokenizer's size; the rows above (tensor-parallel padding,
    never a target) are dropped."""
    source_vocab = (state.fingerprint.get("weights_from") or {}).get("vocab_size")
    if isinstance(source_vocab, int) and 0 < source_vocab <= model.vocab:
        return source_vocab
    if tok is not None and tok.vocab_size < model.vocab:
        return tok.vocab_size
    return model.vocab


# --------------------------------------------------------------------------------------
# Reading full tensors from any layout, one at a time
# --------------------------------------------------------------------------------------


class CheckpointReader:
    """Full (tp-gathered) tensors of one checkpoint by our logical names, e.g.
    reader.tensor('layers.0.attention.wq.weight') -> (hidden, hidden), in the dtype on disk
    (fp32 for ZeRO 3, whose weights come from the fp32 partitions).

    Memory: the files of one pipeline item at a time are memory-mapped (only the pages of
    the tensors read become resident) and unmapped when the next item is asked for, so the
    reader holds about one item's slices, never the model. Ask in item order (Hugging Face's
    order is) or files are mapped again."""

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt
        self.state, self.model = _read_state(ckpt)
        lay = self.state.layout
        self.tp, self.pp, self.zero_stage = lay.tp, lay.pp, lay.zero_stage
        self.mp = lay.model_ranks  # files per stage: one per rank of the expert group (tp unless ep > tp)
        self.dtype = DTYPES.get(lay.dtype, torch.float32)
        self._item: Optional[tuple[int, list]] = None  # (item index, each tp rank's open files)
        self._zero3_index: list[dict] = []  # ZeRO 3: per tp rank, name -> where its pieces are
        self._stacked: Optional[tuple[str, torch.dtype, torch.Tensor]] = None  # the last stacked expert tensor read
        if self.zero_stage == 3:
            self._zero3_index = [self._zero3_layout(r) for r in range(self.mp)]
        else:
            for index in (0, len(pipeline_items(self.model)) - 1):  # refuse a missing file up front
                self._item_paths(index)

    def _need(self, path: Path) -> Path:
        if not path.is_file():
            raise ConfigError("--checkpoint", f"{path}: missing (layout tp={self.tp} pp={self.pp} "
                              f"zero={self.zero_stage} from {STATE})")
        return path

    def _item_paths(self, index: int) -> list[Path]:
        if self.pp == 1:
            return [self._need(model_states_file(self.ckpt, r)) for r in range(self.mp)]
        if self.model.tie_embeddings and index == len(pipeline_items(self.model)) - 1:
            index = 0  # the tied head's weight is saved with the embedding only
        files = layer_files(self.ckpt, index)
        if len(files) != self.mp:
            raise ConfigError("--checkpoint", f"{self.ckpt}: {len(files)} files for pipeline item {index}, "
                              f"expected one per model-parallel rank ({self.mp})")
        return files

    def _zero3_optim_paths(self, tp_rank: int) -> list[Path]:
        paths = optim_files(self.ckpt, tp_rank)
        if not paths:
            raise ConfigError("--checkpoint", f"{self.ckpt}: no ZeRO 3 optimizer files for tp rank {tp_rank}")
        return paths

    def _zero3_layout(self, tp_rank: int) -> dict:
        """Where each parameter of one tp rank is: name -> (group, offset, piece, shape). ZeRO 3
        cuts every parameter into dp equal pieces (the last padded); dp rank d's flat fp32
        group holds piece d of each of the group's parameters, in order (zero_to_fp32.py)."""
        paths = self._zero3_optim_paths(tp_rank)
        world = len(paths)
        with _reading(paths[:1]):
            count = zero3_partition_count(optimizer_state(_load(paths[0])), world)
        if count != world:
            raise ConfigError("--checkpoint", f"{self.ckpt}: {world} ZeRO 3 files for tp rank {tp_rank}, "
                              f"the optimizer was partitioned {count} ways")
        model_file = self._need(zero3_model_states_file(self.ckpt, tp_rank))
        where = {}
        with _reading([model_file]):
            for group, shapes in enumerate(param_shapes(_load(model_file))):  # per group: {name: shape}
                offset = 0
                for name, shape in shapes.items():
                    piece = math.ceil(math.prod(shape) / world)
                    where[name] = (group, offset, piece, shape)
                    offset += piece
        return where

    def _open(self, index: int) -> list:
        """Each tp rank's files for pipeline item `index`: a state dict (pipeline > 1: the
        item's; pipeline = 1: the module's), or ZeRO 3's flat groups of every dp rank."""
        if self._item is None or self._item[0] != index:
            self._item = None  # unmap the previous item's files first
            paths = self._paths(index)
            with _reading(paths):
                if self.zero_stage == 3:
                    files = [[zero3_flat_groups(optimizer_state(_load(p))) for p in self._zero3_optim_paths(r)]
                             for r in range(self.mp)]
                else:
                    files = [_load(p) for p in paths]
                    if self.pp == 1:
                        files = [module_weights(f) for f in files]
            self._item = (index, files)
        return self._item[1]

    def _paths(self, index: int) -> list[Path]:
        """The files pipeline item `index` is read from (named when they are not what was saved)."""
        if self.zero_stage == 3:
            return [p for r in range(self.mp) for p in self._zero3_optim_paths(r)]
        return self._item_paths(index)

    def _slice(self, ours: str, tp_rank: int) -> tuple[tuple[int, ...], list[torch.Tensor]]:
        """This tp rank's slice: its shape and its contents, row-major, as consecutive pieces
        (one memory-mapped tensor; ZeRO 3: the 1-D pieces of every dp rank, the last padded)."""
        index, key = item_key(self.model, ours)
        files = self._open(index)[tp_rank]
        if self.zero_stage == 3:
            group, offset, piece, shape = self._zero3_index[tp_rank][saved_name(index, key, pp=1)]
            # detached: ZeRO 3 saves its flat groups with requires_grad, and a copy out of one
            # would keep the mapped file alive through its grad_fn
            return shape, [flat[group][offset:offset + piece].detach() for flat in files]
        # pipeline 1: the module's weights, by saved name; pipeline > 1: the item's file, by key
        part = files[saved_name(index, key, pp=1) if self.pp == 1 else key].detach()
        return tuple(part.shape), [part]

    def tensor(self, ours: str, dtype: Optional[torch.dtype] = None, rows: Optional[int] = None) -> torch.Tensor:
        """The full tensor, a new one in `dtype` (default: as on disk): each tp slice is cast
        and copied straight into its place along the tp dimension (one allocation, no
        intermediate). `rows`: keep the first rows only (a vocabulary trim; vocabulary rows
        are dim 0, tp rank r holds rows [r*n/tp, (r+1)*n/tp))."""
        dim, dtype = hf_names.tp_dim(ours), dtype or self.dtype
        row = hf_names.stacked_expert(ours)
        if row is not None:  # one expert of a stacked tensor (Mixtral's names): read the stack once
            if self._stacked is None or self._stacked[:2] != (row[0], dtype):
                self._stacked = (row[0], dtype, self.tensor(row[0], dtype))
            return self._stacked[2][row[1]].clone()
        paths = self._paths(item_key(self.model, ours)[0])
        with _reading(paths):
            # an expert weight is split over the expert group's ranks; its dense neighbours over
            # tp, with the same copy on the group's other data ranks (model ranks tp and up)
            ranks = self.mp if hf_names.is_expert(ours) else self.tp if dim is not None else 1
            slices = [self._slice(ours, r) for r in range(ranks)]
            return self._gather(ours, slices, dim, dtype, rows)

    def _gather(self, ours: str, slices: list, dim: Optional[int], dtype: torch.dtype,
                rows: Optional[int]) -> torch.Tensor:
        """The full tensor from each tp rank's (shape, pieces), checked against the model's shape."""
        expected = hf_names.full_shape(self.model, ours)
        along = dim if dim is not None else 0
        got = list(slices[0][0])
        if len(got) == len(expected):
            got[along] = sum(shape[along] for shape, _ in slices)
        if tuple(got) != expected or any(sum(p.numel() for p in pieces) < math.prod(shape) for shape, pieces in slices):
            raise _ShapeMismatch(f"{ours} has shape {tuple(got)} on disk, the model's is {expected}")
        kept, start = [], 0  # rows of each slice that are kept
        for shape, _ in slices:
            kept.append(shape[0] if rows is None else max(0, min(rows - start, shape[0])))
            start += shape[0]
        cat_dim = dim if dim is not None else 0
        widths = [k if cat_dim == 0 else shape[cat_dim] for k, (shape, _) in zip(kept, slices)]
        full = list(slices[0][0])
        full[0] = sum(kept) if cat_dim == 0 else kept[0]
        if cat_dim != 0:
            full[cat_dim] = sum(widths)
        out = torch.empty(full, dtype=dtype)
        at = 0
        for (shape, pieces), k, width in zip(slices, kept, widths):
            if k:
                _copy_rows(out.narrow(cat_dim, at, width), shape, pieces, k)
            at += width
        return out

    def close(self) -> None:
        self._item = self._stacked = None


def _copy_rows(dest: torch.Tensor, shape: tuple[int, ...], pieces: list[torch.Tensor], rows: int) -> None:
    """dest (rows, ...) <- the first `rows` rows of the tensor of `shape` whose row-major
    contents are the consecutive `pieces`, cast on the way."""
    if len(pieces) == 1 and tuple(pieces[0].shape) == tuple(shape):
        dest.copy_(pieces[0][:rows])
        return
    if not dest.is_contiguous():  # a column block of the output (ZeRO 3 with tp > 1)
        dest.copy_(torch.cat(pieces)[:math.prod(shape)].view(shape)[:rows])
        return
    flat, at = dest.view(-1), 0
    for piece in pieces:
        n = min(piece.numel(), flat.numel() - at)
        if n <= 0:
            break
        flat[at:at + n].copy_(piece[:n])
        at += n
