"""An anisotropic CT-like phantom in MSD layout: thick axial slices, Hounsfield units, no case labels.

The MR-like phantom (``medmtl.data.synthetic``) is isotropic, MR-scaled and carries case classes; planning needs
the other corner too: CT intensities (air -1000 HU, soft tissue around 40 HU, an enhancing organ and lesion),
0.8 x 0.8 mm in-plane and several-mm slices (``medmtl plan`` then finds it anisotropic), and presence-mode
heads. Cases are small and deterministic (one seed), so tests can fingerprint them in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medmtl.data.datalist import write_dataset_json
from medmtl.errors import MedmtlError

__all__ = ["CT_LABELS", "generate_ct_dataset"]

CT_LABELS = {"0": "background", "1": "organ", "2": "lesion"}
_HU = {"air": -1000.0, "body": 40.0, "organ": 120.0, "lesion": 200.0}  # contrast-enhanced organ, brighter lesion
_NOISE_HU = 15.0


def _case(rng: np.random.Generator, shape: tuple[int, int, int], spacing: Sequence[float]
          ) -> tuple[np.ndarray, np.ndarray]:
    """HU image (int16) and label (uint8) of one case, drawn in mm so the anatomy does not depend on spacing."""
    mm = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*mm, indexing="ij")
    extent = np.asarray(shape) * np.asarray(spacing) / 2  # half the field of view per axis, mm
    body = (x / (0.9 * extent[0])) ** 2 + (y / (0.8 * extent[1])) ** 2 <= 1  # a cylinder along z
    centre = rng.uniform(-0.1, 0.1, 3) * extent
    radii = extent * np.array([0.45, 0.4, 0.6]) * rng.uniform(0.9, 1.1, 3)
    organ = (((np.stack([x, y, z], -1) - centre) / radii) ** 2).sum(-1) <= 1
    lesion_centre = centre + rng.uniform(-0.3, 0.3, 3) * radii
    lesion = (((np.stack([x, y, z], -1) - lesion_centre) / (0.35 * radii)) ** 2).sum(-1) <= 1
    lesion &= organ
    label = np.zeros(shape, np.uint8)
    label[organ] = 1
    label[lesion] = 2
    image = np.full(shape, _HU["air"])
    image[body] = _HU["body"]
    image[organ] = _HU["organ"]
    image[lesion] = _HU["lesion"]
    image += rng.normal(0.0, _NOISE_HU, shape)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label


def generate_ct_dataset(
    out_dir: Path | str,
    cases: int = 4,
    shape: Sequence[int] = (48, 48, 10),
    spacing: Sequence[float] = (0.8, 0.8, 5.0),
    slice_spacings: Sequence[float] | None = None,
    seed: int = 0,
) -> Path:
    """Write an anisotropic CT-like dataset: imagesTr/labelsTr NIfTI pairs and ``dataset.json`` (modality CT).

    Args:
        out_dir: output folder; must be absent or empty.
        cases: number of training cases.
        shape: voxels per axis (x, y, z), the same for every case; z is the slice axis.
        spacing: mm per axis; the affine is diagonal (RAS), so the voxel axes are the RAS axes.
        slice_spacings: per case z spacing (cycled), overriding ``spacing[2]``: scans of one dataset often
            differ in slice thickness, which is what nnU-Net's 10th-percentile rule is about.
        seed: random seed; the same seed writes identical files.

    Returns:
        the path of ``dataset.json`` (written last: a folder holding it is complete).

    Raises:
        MedmtlError: bad arguments or a non-empty ``out_dir``.
    """
    out = Path(out_dir).expanduser().absolute()
    if cases < 1 or len(shape) != 3 or min(shape) < 2 or len(spacing) != 3 or min(spacing) <= 0:
        raise MedmtlError(f"ct phantom: need cases >= 1, 3 edges >= 2 and 3 positive spacings "
                          f"(got {cases}, {tuple(shape)}, {tuple(spacing)})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedmtlError(f"{out}: exists and is not an empty folder")
    thickness = list(slice_spacings) if slice_spacings else [float(spacing[2])]
    training = []
    for i in range(cases):
        case_spacing = (float(spacing[0]), float(spacing[1]), float(thickness[i % len(thickness)]))
        image, label = _case(np.random.default_rng([seed, i]), tuple(int(n) for n in shape), case_spacing)
        affine = np.diag([*case_spacing, 1.0])
        name = f"ctphantom_{i:03d}.nii.gz"
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            (out / folder).mkdir(parents=True, exist_ok=True)
            img = nib.Nifti1Image(array, affine)
            img.set_sform(affine, code=1)
            img.set_qform(affine, code=1)
            nib.save(img, out / folder / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "medmtl-ct-phantom",
        "description": "Anisotropic CT-like phantom: organ (label 1) with a lesion (label 2), HU intensities",
        "reference": f"medmtl.data.ct_phantom (seed {seed})",
        "licence": "Apache-2.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": CT_LABELS,
        "numTraining": cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    return write_dataset_json(out, meta)
