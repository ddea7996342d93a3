"""A PNG per frame: the crop with its 2D skeleton beside the lifted 3D skeleton.

Left limbs are blue, right limbs red, the spine and head grey (a bone takes
the side of its child joint, from ``skeleton.FLIP_PAIRS``). The 3D pose is in
camera axes (x right, y down, z forward); it is drawn with "up" = -y, so a
standing person stands.
"""
from __future__ import annotations

from matplotlib.animation import PillowWriter
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np

from contextpose_jax import skeleton

# Parent of each joint (-1: the root), in each dataset's 17-joint order.
PARENTS = {
    # pelvis, r hip/knee/ankle, l hip/knee/ankle, spine, thorax, nose, head,
    # l shoulder/elbow/wrist, r shoulder/elbow/wrist.
    "h36m": (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15),
    # MPI-INF-3DHP (mpii_get_joints.m, 17 joints): head top, neck, r arm,
    # l arm, r leg, l leg, pelvis (root, 14), spine, head.
    "3dhp": (1, 15, 1, 2, 3, 1, 5, 6, 14, 8, 9, 14, 11, 12, -1, 14, 1),
}
LEFT_COLOR = "#1f5fd6"
RIGHT_COLOR = "#d62728"
CENTER_COLOR = "#555555"


def bones(dataset: str = "h36m"):
  """``[(parent, child, colour)]`` for every bone of the 17-joint skeleton."""
  if dataset not in PARENTS:
    raise ValueError(f"dataset must be one of {sorted(PARENTS)}, got {dataset!r}")
  left, right = skeleton.FLIP_PAIRS[dataset]
  out = []
  for child, parent in enumerate(PARENTS[dataset]):
    if parent < 0:
      continue
    color = LEFT_COLOR if child in left else RIGHT_COLOR if child in right else CENTER_COLOR
    out.append((parent, child, color))
  return out


def plot_pose(path: str, crop_rgb, keypoints_crop, pose_3d, *, dataset: str = "h36m",
              elev: float = 15.0, azim: float = -70.0, title: str | None = None,
              dpi: int = 100) -> None:
  """Writes the two-panel PNG to ``path``.

  Args:
    crop_rgb: (256, 192, 3) uint8 crop.
    keypoints_crop: (17, 2) keypoints in crop pixels.
    pose_3d: (17, 3) root-relative joints (metres, camera axes).
    elev, azim: the 3D view (matplotlib degrees).
  """
  # The object API (no pyplot): no global state, safe in any backend setup.

  crop_rgb = np.asarray(crop_rgb)
  kp = np.asarray(keypoints_crop, dtype=np.float64)
  pose = np.asarray(pose_3d, dtype=np.float64)
  if kp.shape != (skeleton.NUM_JOINTS, 2) or pose.shape != (skeleton.NUM_JOINTS, 3):
    raise ValueError(f"plot_pose: want (17, 2) and (17, 3) joints, got {kp.shape}, "
                     f"{pose.shape}")
  skeleton_bones = bones(dataset)

  fig = Figure(figsize=(8.0, 4.6), dpi=dpi)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 2, 1)
  ax.imshow(crop_rgb)
  for parent, child, color in skeleton_bones:
    ax.plot(kp[[parent, child], 0], kp[[parent, child], 1], color=color, linewidth=2.5)
  ax.scatter(kp[:, 0], kp[:, 1], s=10, c="white", edgecolors="black", linewidths=0.5,
             zorder=3)
  ax.set_xlim(-0.5, crop_rgb.shape[1] - 0.5)
  ax.set_ylim(crop_rgb.shape[0] - 0.5, -0.5)
  ax.set_axis_off()
  ax.set_title("input crop + 2D keypoints", fontsize=9)

  ax3 = fig.add_subplot(1, 2, 2, projection="3d")
  # Plot axes: (x, z, -y) = (right, depth, up).
  xyz = np.stack([pose[:, 0], pose[:, 2], -pose[:, 1]], axis=-1)
  for parent, child, color in skeleton_bones:
    seg = xyz[[parent, child]]
    ax3.plot(seg[:, 0], seg[:, 1], seg[:, 2], color=color, linewidth=2.5)
  ax3.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], s=8, c="black", depthshade=False)
  centre = (xyz.max(0) + xyz.min(0)) / 2
  radius = max(float(np.abs(xyz - centre).max()), 0.05) * 1.1
  _axes_3d_frame(ax3, radius, elev, azim, centre=centre, fontsize=8)
  ax3.set_title("3D pose (root-relative)", fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, format="png")


def _axes_3d_frame(ax3, radius, elev, azim, *, centre=(0.0, 0.0, 0.0), fontsize=7):
  """Equal-aspect 3D axes (x, z, -y) of half-width `radius` about `centre`."""
  for setter, c in zip((ax3.set_xlim, ax3.set_ylim, ax3.set_zlim), centre):
    setter(c - radius, c + radius)
  ax3.set_box_aspect((1, 1, 1))
  ax3.view_init(elev=elev, azim=azim)
  ax3.set_xlabel("x (m)", fontsize=fontsize)
  ax3.set_ylabel("z (m)", fontsize=fontsize)
  ax3.set_zlabel("-y (m)", fontsize=fontsize)
  ax3.tick_params(labelsize=fontsize - 2, pad=0)
  # At most 4 ticks an axis: matplotlib's default 7-9 overprint each other on
  # a small figure (the GIF).
  for axis in (ax3.xaxis, ax3.yaxis, ax3.zaxis):
    axis.set_major_locator(MaxNLocator(4))


def animate_poses(path: str, poses_3d, *, dataset: str = "h36m", fps: float = 10.0,
                  elev: float = 15.0, azim: float = -70.0, titles=None,
                  size_inches: float = 4.8, dpi: int = 100) -> None:
  """Writes an animated GIF of the 3D skeleton over frames (matplotlib's PillowWriter).

  ``poses_3d`` (N, 17, 3) root-relative (metres, camera axes). The axes are
  fixed over the whole clip (centred on the root), so motion is visible.
  """

  poses = np.asarray(poses_3d, dtype=np.float64)
  if poses.ndim != 3 or poses.shape[1:] != (skeleton.NUM_JOINTS, 3):
    raise ValueError(f"animate_poses: want (N, 17, 3) joints, got {poses.shape}")
  xyz = np.stack([poses[..., 0], poses[..., 2], -poses[..., 1]], axis=-1)
  finite = xyz[np.isfinite(xyz).all(-1)]
  radius = max(float(np.abs(finite).max()) if finite.size else 1.0, 0.05) * 1.1
  skeleton_bones = bones(dataset)

  fig = Figure(figsize=(size_inches, size_inches), dpi=dpi)
  FigureCanvasAgg(fig)
  ax3 = fig.add_subplot(1, 1, 1, projection="3d")
  writer = PillowWriter(fps=fps)
  with writer.saving(fig, path, dpi):
    for i, frame in enumerate(xyz):
      ax3.cla()
      _axes_3d_frame(ax3, radius, elev, azim, fontsize=9)
      for parent, child, color in skeleton_bones:
        seg = frame[[parent, child]]
        ax3.plot(seg[:, 0], seg[:, 1], seg[:, 2], color=color, linewidth=2.0)
      ax3.set_title(str(titles[i]) if titles is not None else f"frame {i}", fontsize=8)
      writer.grab_frame()
