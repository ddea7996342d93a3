"""``capf-predict``: flags, their checks, and the run.

Only light modules are imported here (absl, the project's CLI library):
``--help`` and argument errors come back before jax, flax, OpenCV or
matplotlib are imported; the run (``pipeline``) imports them.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Sequence

from absl import flags

from contextpose_jax import cli
from contextpose_jax import host_devices
from contextpose_jax import host_memory
from contextpose_jax import paths
from contextpose_jax.predict.errors import InputError

KEYPOINT_FORMATS = ("h36m", "coco", "3dhp")
# geometry.KEYPOINT_BOX_ENLARGE (geometry imports numpy; a test keeps them equal).
KEYPOINT_BOX_ENLARGE = 1.25
IOU_THRESHOLD, MAX_MISSES = 0.3, 10        # tracking.IOU_THRESHOLD / MAX_MISSES
PATH_FLAGS = ("checkpoint", "image", "images", "video", "keypoints", "detector",
              "detections", "output")

_FLAGS = flags.FlagValues()
_BOOLEAN_FLAGS = ("flip_test", "plot", "fold_batch_norm", "animation", "overwrite",
                  "propagate_box")
_REQUIRED = ("checkpoint", "output")


def _define_flags(fv: flags.FlagValues) -> None:
  d = dict(flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "a model directory: a converter output "
                      "(model_config.json + variables/), a training workdir (its best "
                      "checkpoint, else its latest) or a step checkpoint "
                      "(WORKDIR/best/<step>, WORKDIR/checkpoints/<step>)", **d)
  flags.DEFINE_string("image", None, "an image, or a folder of frames", **d)
  flags.DEFINE_string("images", None, "a folder of frames (sorted by name)", **d)
  flags.DEFINE_string("video", None, "a video file (read with OpenCV)", **d)
  flags.DEFINE_string("keypoints", None, "2D keypoints (pixels): JSON or npz with "
                      "'keypoints', optional 'frames', 'bbox' (one person per frame), or a "
                      "COCO keypoint results JSON (several people per frame; with "
                      "--keypoint_format=coco); without it, --detector finds them", **d)
  flags.DEFINE_string("detections", None, "person boxes from any detector: a COCO "
                      "detection results JSON [{image_id, bbox: [x, y, w, h], score, "
                      "category_id}]; image_id is the frame index of a video or a file "
                      "name (or stem); --detector finds each person's 2D", **d)
  flags.DEFINE_float("min_score", 0.3, "drop --detections boxes (and COCO keypoint "
                     "results) scored under this", **d)
  flags.DEFINE_string("detector", None, "a converted COCO backbone (with its heatmap head) "
                      "that detects the 2D keypoints when --keypoints is not given", **d)
  flags.DEFINE_enum("keypoint_format", None, list(KEYPOINT_FORMATS),
                    "joint order of --keypoints: the checkpoint's own (h36m, or 3dhp for "
                    "MPI-INF-3DHP models; the default) or coco (mapped to Human3.6M)", **d)
  flags.DEFINE_string("bbox", None, "x0,y0,x1,y1 person box in pixels, for every frame "
                      "(overrides a 'bbox' in the keypoints file; made square); default: "
                      "the keypoints' extent, enlarged (detection: the whole frame)", **d)
  flags.DEFINE_float("keypoint_box_enlarge", KEYPOINT_BOX_ENLARGE,
                     "box side / keypoints' extent when no box is given", **d)
  flags.DEFINE_integer("smooth", 0, "centred moving average of the 2D keypoints over this "
                       "many frames, per track (odd; 0 or 1: off)", **d)
  flags.DEFINE_float("track_iou", IOU_THRESHOLD, "tracking: the least IoU that links a "
                     "person box to a track", **d)
  flags.DEFINE_integer("track_max_misses", MAX_MISSES, "tracking: a track missed for more "
                       "frames than this ends (its id is not reused)", **d)
  flags.DEFINE_boolean("propagate_box", False, "single-person detection on a video: detect "
                       "in the box of the previous frame's keypoints (enlarged), starting "
                       "again from --bbox or the whole frame when the scores collapse", **d)
  flags.DEFINE_float("restart_score", 0.3, "--propagate_box: the mean 2D score under which "
                     "the propagated box is dropped", **d)
  flags.DEFINE_string("output", None, "new directory to write", **d)
  flags.DEFINE_boolean("overwrite", False, "replace --output if an earlier capf-predict "
                       "wrote it (any other existing path is still refused)", **d)
  flags.DEFINE_boolean("flip_test", False, "average with the prediction on the mirrored "
                       "input", **d)
  flags.DEFINE_boolean("plot", True, "write a PNG per frame (per person)", **d)
  flags.DEFINE_boolean("animation", True, "with --plot and several frames of one person, "
                       "also write skeleton.gif (the 3D skeleton over time)", **d)
  flags.DEFINE_enum("render", None, ["mp4"], "mp4: also write overlay.mp4, each frame with "
                    "every track's 2D skeleton in its own colour beside a 3D panel per track",
                    **d)
  flags.DEFINE_float("fps", None, "frame rate of skeleton.gif and overlay.mp4 (default: the "
                     "video's, or 10)", **d)
  flags.DEFINE_float("elev", 15.0, "3D view elevation (degrees)", **d)
  flags.DEFINE_float("azim", -70.0, "3D view azimuth (degrees)", **d)
  flags.DEFINE_integer("batch_size", 8, "crops per model call", **d)
  flags.DEFINE_boolean("fold_batch_norm", True, "fold the backbone's BatchNorms into its "
                       "convs at load time (same numbers up to rounding; faster)", **d)
  flags.DEFINE_string("compilation_cache", "default", "JAX's persistent compilation cache "
                      "directory; 'default': $CONTEXTPOSE_JAX_CACHE or "
                      "~/.cache/contextpose_jax/xla; off: off", **d)
  flags.DEFINE_enum("host_malloc", None, host_memory.SETTINGS, "glibc malloc settings "
                    "for XLA:CPU's per-run temporaries (contextpose_jax/host_memory.py); "
                    "default: $CONTEXTPOSE_JAX_HOST_MALLOC, else auto", **d)


_define_flags(_FLAGS)

USAGE = """usage: capf-predict --checkpoint=MODEL_DIR
    (--image=IMG_OR_DIR | --images=DIR | --video=FILE)
    (--keypoints=FILE | --detector=COCO_DIR [--detections=FILE]) [--bbox=x0,y0,x1,y1]
    --output=NEW_DIR

Lift 2D keypoints of one or several people on your own images or videos to 3D
with a CA-PF model (docs/inference.md).
"""


def parse_flags(argv: Sequence[str]):
  """argv (without the program name) -> an options namespace; InputError on misuse."""
  # argparse spelled negated booleans --no-NAME; absl spells them --noNAME.
  argv = [("--no" + a[5:]) if a.startswith("--no-") and a[5:].split("=")[0] in _BOOLEAN_FLAGS
          else a for a in argv]
  rest = cli.parse(_FLAGS, argv, USAGE)
  if rest:
    raise InputError(f"unexpected arguments {rest} (flags are --name=value)")
  for name in _REQUIRED:
    if _FLAGS[name].value is None:
      raise InputError(f"--{name} is required (see --help)")
  args = cli.values(_FLAGS)
  for name in PATH_FLAGS:
    setattr(args, name, paths.expand(getattr(args, name)))
  if args.compilation_cache not in ("default", "off"):
    args.compilation_cache = paths.expand(args.compilation_cache)
  return args


def check_options(args) -> None:
  """The flags' own ranges and combinations (no file is read)."""
  if args.batch_size < 1:
    raise InputError(f"--batch_size must be >= 1, got {args.batch_size}")
  if not args.keypoint_box_enlarge > 0:
    raise InputError(f"--keypoint_box_enlarge must be > 0, got {args.keypoint_box_enlarge}")
  if args.smooth < 0 or (args.smooth > 1 and args.smooth % 2 == 0):
    raise InputError(f"--smooth must be 0 (off) or an odd number of frames, got {args.smooth}")
  if args.fps is not None and not args.fps > 0:
    raise InputError(f"--fps must be > 0, got {args.fps}")
  if not 0 < args.track_iou <= 1:
    raise InputError(f"--track_iou must be in (0, 1], got {args.track_iou}")
  if args.track_max_misses < 0:
    raise InputError(f"--track_max_misses must be >= 0, got {args.track_max_misses}")
  for name in ("min_score", "restart_score"):
    value = getattr(args, name)
    if value != value or abs(value) == float("inf"):
      raise InputError(f"--{name} must be a finite number, got {value}")
  sources = [f"--{n}" for n in ("image", "images", "video") if getattr(args, n)]
  if len(sources) != 1:
    raise InputError("give exactly one of --image, --images, --video"
                     + (f" (got {', '.join(sources)})" if sources else ""))


class Terminated(BaseException):
  """SIGTERM, raised in the main thread so that every staging folder is removed."""


def _on_sigterm(signum, frame):
  del frame
  raise Terminated(signum)


def main(argv: Sequence[str] | None = None, *, detector=None) -> int:
  """The CLI: ``main(["--checkpoint=...", ...])`` -> exit status (0, 1, or
  128 + the signal: 130 for Ctrl-C, 143 for SIGTERM)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
  try:
    return _main(argv, detector)
  except KeyboardInterrupt:
    print("error: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
    return 128 + signal.SIGINT
  except Terminated:
    print("error: terminated (SIGTERM); nothing was written", file=sys.stderr)
    return 128 + signal.SIGTERM
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)


def _main(argv, detector) -> int:
  try:
    args = parse_flags(argv)
    from contextpose_jax.predict import writers  # pylint: disable=import-outside-toplevel
    writers.check_output(args.output, args.overwrite)  # before any model work
    check_options(args)
    host_devices.skip_absent_backends()
    try:  # before the JAX backend starts
      host_memory.configure(args.host_malloc)
    except ValueError as e:  # a bad $CONTEXTPOSE_JAX_HOST_MALLOC
      raise InputError(str(e)) from None
    # The heavy imports (jax, flax, OpenCV, matplotlib): the arguments are valid.
    from contextpose_jax import compile_cache  # pylint: disable=import-outside-toplevel
    from contextpose_jax.predict import pipeline  # pylint: disable=import-outside-toplevel
    compile_cache.enable(args.compilation_cache)
    out = pipeline.run(args, detector=detector)
  except cli.Exit as e:  # --help (0), or a flag error already printed as one line
    return 0 if e.code == 0 else 1
  except (InputError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0
