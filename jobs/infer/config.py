"""Every setting of the batch job, declared once (``jobs.flags``: the flags are built from the
fields, whose checks fail with a ``UsageError`` naming the flag): :class:`JobConfig` is what
``pipeline.run_job`` takes; a new setting is one field here, and where it is used. The run's
output settings (``settings``: the part of a row's identity besides the model,
``schema.settings_key``) are computed here once and handed to the model actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from jobs.flags import Settings, above, at_least, setting, unit
from jobs.infer import schema
from jobs.infer.errors import UsageError
from jobs.infer.execute.decode import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS
from jobs.infer.plan.listing import DEFAULT_TARGET_PARTS
from jobs.infer.plan.planner import DEFAULT_SHARD_SIZE
from jobs.storage import RetryPolicy

# How images are decoded: large JPEGs DCT-downscaled to the model's input in the CPU tasks
# (sized), everything at full size in the CPU tasks (full), or JPEGs by the model actor on its
# device, nvJPEG on a GPU (device; the CPU tasks only read bytes and check headers).
DECODE_MODES = ("sized", "full", "device")
PRECISIONS = ("fp32", "bf16", "fp16")
# Cap on decode tasks running at once, cluster-wide. A task reads one object at a time, so
# this bounds the GETs in flight: S3 serves at least 5,500 GET/HEAD per second per partitioned
# prefix, and at its typical 100-200 ms per small-object GET, 512 readers stay at about
# 2,500-5,000 GET/s, within one partition's rate before any decoding time is counted.
DEFAULT_MAX_CONCURRENT_READS = 512


@dataclass
class JobConfig(Settings):
    error = UsageError
    input: str = setting(help="image prefix/directory or list file (s3://... or local)")
    output: str = setting(help="output root (s3://... or local)")
    weights: str = setting(help="checkpoint path or URI: ours, a torchvision state_dict, or Detectron2's (.pth, "
                                "zoo .pkl)")
    model_config: Optional[str] = setting(
        None, "a Detectron2 checkpoint's YAML config, _BASE_ files included (default: Detectron2's defaults); its "
              "test sizes, anchors, thresholds, pixel mean/std and input format apply")
    class_names: Optional[str] = setting(
        None, "file of class names for labels 1, 2, ... (one a line, or a JSON list), for a model whose file does "
              "not name its classes (default: the checkpoint's, COCO's for a COCO model, else the label numbers)")
    full: bool = setting(False, "process every image, not only new or changed ones")
    num_actors: Optional[int] = setting(None, "model actors (default: as many as the cluster's GPUs, or CPUs, hold)",
                                        check=at_least(1))
    num_gpus_per_actor: float = setting(0.0, "GPUs per actor; 0 = CPU actors", check=at_least(0))
    num_cpus_per_actor: float = setting(
        1.0, "CPUs per actor (torch threads on CPU; one replica per core outruns one replica on many)",
        check=above(0))
    batch_size: int = setting(4, "images per model call", check=at_least(1))
    score_thresh: Optional[float] = setting(
        None, "keep instances scoring above this (default: the checkpoint's own threshold)", check=unit)
    max_instances: Optional[int] = setting(
        None, "instances kept per image, the highest scores (default: the checkpoint's own)", check=at_least(1))
    precision: Optional[str] = setting(
        None, "the model's arithmetic (default: bf16 on GPU actors, fp32 on CPU actors; bf16 on CPU actors needs "
              "AVX512_BF16 or AMX, fp16 a GPU). Like the three flags here, changing it gives every image a new "
              "result: the next run reprocesses all", choices=PRECISIONS)
    decode: str = setting(
        "sized", "sized (default): a JPEG over twice the model's input is decoded DCT-downscaled to at least that "
                 "input (rows and masks stay full-size); full: every image at full size; device: the model actor "
                 "decodes JPEGs on its device (nvJPEG on GPU actors) and the CPU tasks only read bytes. An output "
                 "setting like --precision", choices=DECODE_MODES)
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "an image with more pixels is an error row (kind limit)",
                              check=at_least(1))
    max_aspect: float = setting(DEFAULT_MAX_ASPECT, "an image longer than this many times its width, or wider, is "
                                                    "an error row (kind limit)", check=at_least(1))
    images_per_shard: int = setting(DEFAULT_SHARD_SIZE, "target rows per output file", check=at_least(1))
    read_attempts: int = setting(
        RetryPolicy.attempts, "tries per read, listing page and stat while the store answers as unavailable "
                              "(throttling, 5xx, timeouts, connection errors)", check=at_least(1))
    read_backoff: float = setting(RetryPolicy.base_s, "seconds: retry i waits a random time up to "
                                                      "min(%(default)s * 2**i, 30)", check=at_least(0))
    list_tasks: int = setting(
        DEFAULT_TARGET_PARTS, "list an S3 prefix split on its common prefixes into about this many parts, and an "
                              "inventory's data files one per part, in Ray tasks; 0 lists the whole input in one "
                              "task", check=at_least(0))
    max_concurrent_reads: int = setting(
        DEFAULT_MAX_CONCURRENT_READS, "decode tasks at once, cluster-wide: each reads one object at a time, so "
                                      "this caps the GETs in flight (the default stays within S3's 5,500 GET/s of a "
                                      "partitioned prefix at 100 ms per GET)", check=at_least(1))
    passes: int = setting(2, "passes over the images whose reads still failed in storage; the last pass commits "
                             "them as error rows that the next run plans again", check=at_least(1))
    run_id: Optional[str] = setting(None, "resume or create this run id")
    break_lock: bool = setting(False, "take the output's writer lease over at once (only when the run holding it "
                                      "is gone)")
    # Not on the command line: the decode tasks' CPU share and StorageHealth's outage rule.
    decode_cpus: float = setting(0.5, flag=False, check=above(0))
    outage_window: int = setting(200, flag=False, check=at_least(1))
    outage_fraction: float = setting(0.5, flag=False, check=unit)
    outage_min_failures: int = setting(10, flag=False, check=at_least(1))

    def __post_init__(self):
        super().__post_init__()
        if self.precision == "fp16" and self.num_gpus_per_actor <= 0:
            raise UsageError("--precision fp16 needs GPU actors (--num-gpus-per-actor > 0); CPU actors run fp32 "
                             "or bf16")

    @property
    def read_retry(self) -> RetryPolicy:
        """How reads, listing pages and stats retry (``--read-attempts``, ``--read-backoff``)."""
        return RetryPolicy(attempts=self.read_attempts, base_s=self.read_backoff)

    @cached_property
    def settings(self) -> Optional[str]:
        """The run's output settings as rows, run parameters and incremental planning hold them."""
        return schema.settings_key(score_thresh=self.score_thresh, max_instances=self.max_instances,
                                   precision=self.precision, decode=self.decode)
