"""A training run's files under OUTPUT, as ``__main__`` describes them: run.json, the contents of
the Ray Train checkpoints, metrics.jsonl, model_final.pt and final.json."""

import dataclasses
import json
import os

import torch

from jobs import storage
from jobs.flags import flag
from jobs.storage import join, resolve
from jobs.train.config import TrainConfig
from mrcnn.checkpoint import load_weights_into, save_checkpoint

# Flags that decide the model a run trains: a resumed run must keep them, since its checkpoints
# hold that model (``--max-iters`` and the optimiser flags may change: continuing is fine).
MODEL_FLAGS = ("arch", "weights", "weights_backbone", "trainable_backbone_layers", "min_size", "max_size",
               "anchor_sizes", "box_batch_size_per_image", "returned_layers", "roi_pooler", "mask_loss", "mask_head")


def read_json(uri) -> dict | None:
    """The JSON file at ``uri``, or None when there is none."""
    try:
        return storage.read_json(*resolve(uri))
    except FileNotFoundError:
        return None


def write_bytes(uri, data: bytes) -> None:
    """Whole-file write: readers see the old content or all of the new (``storage.write_atomic``)."""
    storage.write_atomic(*resolve(uri), data)


class OtherRunError(ValueError):
    """``--output`` holds a run of another model."""


def check_same_model(cfg: TrainConfig) -> None:
    """Record the model flags of a new run in OUTPUT/run.json; refuse to resume one made with others."""
    uri = join(cfg.output, "run.json")
    wanted = {k: getattr(cfg, k) for k in MODEL_FLAGS}
    held = read_json(uri)
    if held is None:
        write_bytes(uri, (json.dumps(wanted, indent=1) + "\n").encode())
    elif changed := [k for k in MODEL_FLAGS if held.get(k) != wanted[k]]:
        was = ", ".join(f"{flag(k)} {held.get(k)} (now {wanted[k]})" for k in changed)
        raise OtherRunError(f"{cfg.output} holds a run of another model: {was}. Resume it with the same flags, "
                            "or give a new --output")


class MetricsLog:
    """OUTPUT/metrics.jsonl kept by rank 0, rewritten whole at each log (object stores cannot append);
    lines an earlier attempt logged after ``start_step`` are dropped: training redoes those steps."""

    def __init__(self, uri, start_step):
        self.uri = uri
        fs, path = resolve(uri)
        lines = fs.cat_file(path).decode().split("\n") if fs.exists(path) else []
        self.lines = [m for m in map(json.loads, filter(str.strip, lines)) if m["step"] <= start_step]

    def log(self, record):
        self.lines.append(record)
        write_bytes(self.uri, "".join(json.dumps(m) + "\n" for m in self.lines).encode())


def _save_model(model, path, class_names, step, cfg: TrainConfig):
    save_checkpoint(model, path, class_names=class_names, keypoint_names=getattr(model, "keypoint_names", None),
                    keypoint_skeleton=getattr(model, "keypoint_skeleton", None),
                    extra_meta={"step": step, "train_config": dataclasses.asdict(cfg)})


def save_train_checkpoint(directory, model, optimizer, scheduler, scaler, step, cfg: TrainConfig, class_names):
    """``model.pt``, ``train_state.pt`` (optimizer, scheduler, scaler, step) and ``meta.json`` in ``directory``."""
    _save_model(model, os.path.join(directory, "model.pt"), class_names, step, cfg)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "step": step}, os.path.join(directory, "train_state.pt"))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"step": step, "class_names": class_names}, f)


def read_checkpoint_meta(directory) -> dict:
    """{"step", "class_names"}: what a resumed worker needs before making its model."""
    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)


def load_train_state(directory, model, optimizer, scheduler, scaler, device) -> None:
    """Restore what :func:`save_train_checkpoint` saved into the objects of a new attempt."""
    load_weights_into(model, os.path.join(directory, "model.pt"))
    state = torch.load(os.path.join(directory, "train_state.pt"), map_location=device, weights_only=True)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        obj.load_state_dict(state[name])


def write_final(model, class_names, step, cfg: TrainConfig) -> None:
    """OUTPUT/model_final.pt, then OUTPUT/final.json, which marks the run finished."""
    final = join(cfg.output, "model_final.pt")
    _save_model(model, final, class_names, step, cfg)
    write_bytes(join(cfg.output, "final.json"), json.dumps({"step": step, "model": final}).encode())
    print(f"[train] final model: {final}", flush=True)
