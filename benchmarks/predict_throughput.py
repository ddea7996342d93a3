r"""End-to-end `capf-predict` throughput (decode + detect + lift + write), frames/s.

    .venv/bin/python -m benchmarks.predict_throughput --checkpoint=/tmp/capf_synthetic \
        [--detector=DIR] [--frames=48] [--batch_size=16] [--repeats=2]

Clips of 1 and 3 people rendered like `examples/two_people` (its generator,
`examples/make_two_people.py`), with the people's boxes given as a COCO
detection results file (`--detections`): every person is cropped, detected by
the COCO backbone `--detector` and lifted by `--checkpoint`. Without
`--detector`, a full-size HRNet-W32 COCO backbone with random weights is made
(detection costs the same whatever the weights).

Each figure is a whole `capf-predict` process, start-up included: the one
streaming pass in batches of `--batch_size` against the same work frame by
frame (`--batch_size=1`), interleaved. A first run of each mode fills a
compilation cache of its own, so the timed runs load their programs instead
of compiling them. Prints the best and the median of `--repeats` runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _coco_detector(directory: str) -> str:
  """A full-size HRNet-W32 COCO backbone (heatmap head), random weights."""
  from contextpose_jax import host_devices  # pylint: disable=import-outside-toplevel
  host_devices.skip_absent_backends()  # no libtpu start-up lines on a CPU host
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from contextpose_jax import compiler_options  # pylint: disable=import-outside-toplevel
  from contextpose_jax.models import capf  # pylint: disable=import-outside-toplevel
  config = capf.default_model_config('hrnet_32')
  config.backbone_kwargs = dict(config.backbone_kwargs, heatmap_head=True)
  model = capf.build_model(config)
  variables = jax.tree_util.tree_map(np.asarray, compiler_options.jit(
      model.init, run_once=True)(jax.random.PRNGKey(0), *capf.dummy_inputs(1)))
  capf.save_variables(directory, {k: {'backbone': v['backbone']}
                                  for k, v in variables.items()}, config)
  return directory


def _clip(directory: str, people: int, frames: int) -> tuple[str, str]:
  """clip.mp4 and a COCO detection results file of its people's boxes."""
  sys.path.insert(0, os.path.join(REPO, 'examples'))
  import make_two_people  # pylint: disable=import-outside-toplevel
  make_two_people.make_clip(directory, people, frames)
  with open(os.path.join(directory, 'keypoints.json')) as f:
    results = json.load(f)
  detections = os.path.join(directory, 'detections.json')
  with open(detections, 'w') as f:
    json.dump([{k: r[k] for k in ('image_id', 'category_id', 'bbox', 'score')}
               for r in results], f)
  return os.path.join(directory, 'clip.mp4'), detections


def _run(args, clip, detections, batch_size, cache, output) -> float:
  """Seconds of one whole capf-predict process."""
  cmd = [sys.executable, '-m', 'contextpose_jax.predict', f'--checkpoint={args.checkpoint}',
         f'--detector={args.detector}', f'--video={clip}', f'--detections={detections}',
         f'--batch_size={batch_size}', '--noplot', f'--compilation_cache={cache}',
         f'--output={output}']
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f'error: {" ".join(cmd)} failed:\n{proc.stderr[-2000:]}')
  return seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--checkpoint', required=True, help='a CA-PF model (workdir or converted)')
  parser.add_argument('--detector', help='a COCO backbone directory (default: random HRNet-W32)')
  parser.add_argument('--frames', type=int, default=48)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix='capf-predict-bench-') as tmp:
    if args.detector is None:
      args.detector = _coco_detector(os.path.join(tmp, 'detector'))
    modes = {f'streaming, batch {args.batch_size}': args.batch_size, 'frame by frame': 1}
    rows = []
    for people in (1, 3):
      clip, detections = _clip(os.path.join(tmp, f'clip{people}'), people, args.frames)
      caches = {mode: os.path.join(tmp, f'cache-{people}-{b}') for mode, b in modes.items()}
      times = {mode: [] for mode in modes}
      for repeat in range(args.repeats + 1):  # run 0 fills the caches
        for mode, batch in modes.items():
          seconds = _run(args, clip, detections, batch, caches[mode],
                         os.path.join(tmp, f'out-{people}-{batch}-{repeat}'))
          if repeat:
            times[mode].append(seconds)
      for mode in modes:
        best, median = min(times[mode]), statistics.median(times[mode])
        rows.append((people, mode, best, median, args.frames / best, args.frames / median))
  print(f'{"people":>6}  {"mode":<22} {"best s":>7} {"median s":>8} '
        f'{"frames/s (best)":>15} {"frames/s (median)":>17}')
  for people, mode, best, median, fps_best, fps_median in rows:
    print(f'{people:>6}  {mode:<22} {best:7.1f} {median:8.1f} {fps_best:15.2f} '
          f'{fps_median:17.2f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
