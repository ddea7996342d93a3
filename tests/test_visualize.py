"""The 3D skeleton GIF is readable at its own size: frames large enough for
their labels, and few enough ticks that the tick labels do not run into each
other (at 256x256 with matplotlib's 7-9 ticks an axis they overprinted)."""
import numpy as np
from PIL import Image

from contextpose_jax import visualize


def test_gif_size_and_ticks(tmp_path):
  rng = np.random.default_rng(0)
  poses = rng.normal(scale=0.3, size=(3, 17, 3))
  path = tmp_path / 'skeleton.gif'
  visualize.animate_poses(str(path), poses)
  with Image.open(path) as gif:
    assert gif.n_frames == 3 and min(gif.size) >= 400, gif.size

  # The GIF's axes, drawn as animate_poses draws them.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(4.8, 4.8), dpi=100)
  canvas = FigureCanvasAgg(fig)
  ax3 = fig.add_subplot(1, 1, 1, projection='3d')
  radius = float(np.abs(poses).max()) * 1.1
  visualize._axes_3d_frame(ax3, radius, 15.0, -70.0, fontsize=9)  # pylint: disable=protected-access
  canvas.draw()
  for axis in (ax3.xaxis, ax3.yaxis, ax3.zaxis):
    lo, hi = sorted(axis.get_view_interval())
    shown = [loc for loc in axis.get_majorticklocs() if lo <= loc <= hi]
    assert 2 <= len(shown) <= 5, (axis.axis_name, shown)
