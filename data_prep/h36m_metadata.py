"""Human3.6M facts: file naming, the frame / video layout, the label table.

(subject, action, subaction, camera) -> base name:

The per-subject file-name prefixes of the 30 (action, subaction) trials, in
the order action 2..16 x subaction 1..2, as listed in the `mapping` table of
the Human3.6M `metadata.xml` that H36M-Toolbox reads (`metadata.py`,
`get_base_filename`); camera ids in its `dbcameras/index2id` order. The
original recordings are named `<prefix>.<camera id>.{cdf,mp4}`.
"""
from __future__ import annotations

import os

import numpy as np

CAMERA_IDS = ('54138969', '55011271', '58860488', '60457274')
SUBJECTS = (1, 5, 6, 7, 8, 9, 11)
TRAIN_SUBJECTS = (1, 5, 6, 7, 8)
VALIDATION_SUBJECTS = (9, 11)
ACTIONS = tuple(range(2, 17))
SUBACTIONS = (1, 2)

_PREFIXES = {
    1: (
        'Directions 1', 'Directions', 'Discussion 1', 'Discussion',
        'Eating 2', 'Eating', 'Greeting 1', 'Greeting',
        'Phoning 1', 'Phoning', 'Posing 1', 'Posing',
        'Purchases 1', 'Purchases', 'Sitting 1', 'Sitting 2',
        'SittingDown 2', 'SittingDown', 'Smoking 1', 'Smoking',
        'TakingPhoto 1', 'TakingPhoto', 'Waiting 1', 'Waiting',
        'Walking 1', 'Walking', 'WalkingDog 1', 'WalkingDog',
        'WalkTogether 1', 'WalkTogether'),
    5: (
        'Directions 1', 'Directions 2', 'Discussion 2', 'Discussion 3',
        'Eating 1', 'Eating', 'Greeting 1', 'Greeting 2',
        'Phoning 1', 'Phoning', 'Posing 1', 'Posing',
        'Purchases 1', 'Purchases', 'Sitting 1', 'Sitting',
        'SittingDown', 'SittingDown 1', 'Smoking 1', 'Smoking',
        'Photo', 'Photo 2', 'Waiting 1', 'Waiting 2',
        'Walking 1', 'Walking', 'WalkDog 1', 'WalkDog',
        'WalkTogether 1', 'WalkTogether'),
    6: (
        'Directions 1', 'Directions', 'Discussion 1', 'Discussion',
        'Eating 1', 'Eating 2', 'Greeting 1', 'Greeting',
        'Phoning 1', 'Phoning', 'Posing 2', 'Posing',
        'Purchases 1', 'Purchases', 'Sitting 1', 'Sitting 2',
        'SittingDown 1', 'SittingDown', 'Smoking 1', 'Smoking',
        'Photo', 'Photo 1', 'Waiting 3', 'Waiting',
        'Walking 1', 'Walking', 'WalkDog 1', 'WalkDog',
        'WalkTogether 1', 'WalkTogether'),
    7: (
        'Directions 1', 'Directions', 'Discussion 1', 'Discussion',
        'Eating 1', 'Eating', 'Greeting 1', 'Greeting',
        'Phoning 2', 'Phoning', 'Posing 1', 'Posing',
        'Purchases 1', 'Purchases', 'Sitting 1', 'Sitting',
        'SittingDown', 'SittingDown 1', 'Smoking 1', 'Smoking',
        'Photo', 'Photo 1', 'Waiting 1', 'Waiting 2',
        'Walking 1', 'Walking 2', 'WalkDog 1', 'WalkDog',
        'WalkTogether 1', 'WalkTogether'),
    8: (
        'Directions 1', 'Directions', 'Discussion 1', 'Discussion',
        'Eating 1', 'Eating', 'Greeting 1', 'Greeting',
        'Phoning 1', 'Phoning', 'Posing 1', 'Posing',
        'Purchases 1', 'Purchases', 'Sitting 1', 'Sitting',
        'SittingDown', 'SittingDown 1', 'Smoking 1', 'Smoking',
        'Photo 1', 'Photo', 'Waiting 1', 'Waiting',
        'Walking 1', 'Walking', 'WalkDog 1', 'WalkDog',
        'WalkTogether 1', 'WalkTogether 2'),
    9: (
        'Directions 1', 'Directions', 'Discussion 1', 'Discussion 2',
        'Eating 1', 'Eating', 'Greeting 1', 'Greeting',
        'Phoning 1', 'Phoning', 'Posing 1', 'Posing',
        'Purchases 1', 'Purchases', 'Sitting 1', 'Sitting',
        'SittingDown', 'SittingDown 1', 'Smoking 1', 'Smoking',
        'Photo 1', 'Photo', 'Waiting 1', 'Waiting',
        'Walking 1', 'Walking', 'WalkDog 1', 'WalkDog',
        'WalkTogether 1', 'WalkTogether'),
    11: (
        'Directions 1', 'Directions', 'Discussion 1', 'Discussion 2',
        'Eating 1', 'Eating', 'Greeting 2', 'Greeting',
        'Phoning 3', 'Phoning 2', 'Posing 1', 'Posing',
        'Purchases 1', 'Purchases', 'Sitting 1', 'Sitting',
        'SittingDown', 'SittingDown 1', 'Smoking 2', 'Smoking',
        'Photo 1', 'Photo', 'Waiting 1', 'Waiting',
        'Walking 1', 'Walking', 'WalkDog 1', 'WalkDog',
        'WalkTogether 1', 'WalkTogether'),
}


def base_filename(subject: int, action: int, subaction: int,
                  camera: int) -> str:
  """'Directions 1.54138969' for (1, 2, 1, 0); camera is 0-based."""
  prefix = _PREFIXES[subject][(action - 2) * 2 + (subaction - 1)]
  return f'{prefix}.{CAMERA_IDS[camera]}'


def videos():
  """All (subject, action, subaction, camera) in the official nesting order."""
  return [(s, a, sa, c) for s in SUBJECTS for a in ACTIONS
          for sa in SUBACTIONS for c in range(4)]

# Pinhole intrinsics (fx, fy, cx, cy) of the four cameras, the same for every
# subject (H36M-Toolbox `camera_data.pkl`, VideoPose3D), and the frame size
# (w, h) of their videos. Only these enter the labels (the box from the root).
INTRINSICS = (
    (1145.04940458804, 1143.78109572365, 512.541504956548, 515.4514869776),
    (1149.67569986785, 1147.59161666764, 508.848621645943, 508.064917088557),
    (1149.14071676148, 1148.7989685676, 519.815837182153, 501.402658888552),
    (1145.51133842318, 1144.77392807652, 514.968197319863, 501.882018537695),
)
FRAME_SIZES = ((1000, 1002), (1000, 1000), (1000, 1000), (1000, 1002))

# Our Human3.6M label table (`human36m.OFFICIAL_FIELDS` maps the official fields).
LABEL_DTYPE = np.dtype([
    ('keypoints_2d', np.float32, (17, 2)),
    ('keypoints_2d_crop', np.float32, (17, 2)),
    ('keypoints_3d', np.float32, (17, 3)),
    ('center', np.float64, (2,)), ('scale', np.float64, (2,)),
    # center / scale were computed in float32 (a float32 pose file): the
    # crop's affine repeats that float32 arithmetic (`crop_box`).
    ('float32_box', np.bool_),
    ('subject', np.int32), ('action', np.int32), ('subaction', np.int32),
    ('camera', np.int32), ('frame', np.int32), ('video_id', np.int32)])


def video_dirname(subject, action, subaction, camera) -> str:
  """The official image folder; `camera` is 0-based (folders are 1-based)."""
  return (f's_{int(subject):02d}_act_{int(action):02d}_subact_'
          f'{int(subaction):02d}_ca_{int(camera) + 1:02d}')


def frame_path(image_root, row) -> str:
  subdir = video_dirname(row['subject'], row['action'], row['subaction'],
                         row['camera'])
  return os.path.join(image_root, subdir,
                      f'{subdir}_{int(row["frame"]):06d}.jpg')


def describe(row) -> str:
  return (video_dirname(row['subject'], row['action'], row['subaction'],
                        row['camera']) + f' frame {int(row["frame"])}')


def video_path(manual_dir, row) -> str:
  name = base_filename(int(row['subject']), int(row['action']),
                                     int(row['subaction']), int(row['camera']))
  return os.path.join(manual_dir, 'extracted', f'S{int(row["subject"])}',
                      'Videos', name + '.mp4')
