"""Atlas segmentation by registration: the classical baseline beside in-context models.

Before in-context networks, a structure was segmented in a new scan from a few
labelled ones by registering each labelled scan (the atlas, here the reference)
onto the query and carrying its mask along. This module does exactly that with
SimpleITK, so every in-context number can be read against it:

* **Registration** (reference = moving, query = fixed): centre alignment, then
  rigid -> affine -> B-spline, each stage multi-resolution with a bounded number
  of iterations. Mattes mutual information is the metric throughout, so CT and MR
  scans register onto each other. A stage that leaves the metric worse than the
  stage before it is dropped (the optimiser bounded in iterations can overshoot),
  and so is an affine result that folds or collapses an axis.
* **Warping**: the reference's class mask (0/1 float) is resampled into the query
  grid with linear interpolation, so the result is a soft vote in [0, 1].
* **Fusion**: k references are averaged; the evaluation thresholds at 0.5
  (majority vote of the warped masks).

One transform serves every class of a reference: registrations are cached by
(reference scan id, query scan id). A registration that fails (SimpleITK raises,
a constant image, a non-finite metric) falls back to centre alignment and is
counted in ``fallbacks`` with the reason, so one bad scan never stops an evaluation.

Images are on the bank's grid (RAS voxel order, origin 0, identity direction), so
both scans of a pair live in one physical frame. Arrays go to SimpleITK without
transposing (its axis order is the reverse of numpy's) with the spacing reversed
to match: the physical frame is then a permutation of the bank's, an isometry,
which registration does not notice and which saves two copies per volume.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from .structures import LabelledScan, StructureClass


@dataclass(frozen=True)
class RegistrationSettings:
    """Parameters of the registration baseline (recorded with every result).

    The defaults register a ~128^3 pair at 1.5 mm in about two seconds on two CPU
    cores: registration runs on 3 mm copies of the images (organ-scale differences
    between subjects, not voxel-scale ones), the metric samples a share of their
    voxels, and the B-spline's control points are coarse and its iterations few.
    """

    working_mm: float = 3.0  # both images are bin-averaged to about this spacing first
    max_working_voxels: int = 750_000  # coarser than working_mm where a scan is larger
    histogram_bins: int = 32  # Mattes mutual information
    sampling: float = 0.1  # share of the working voxels sampled per metric evaluation
    shrink: tuple[int, ...] = (2, 1)  # pyramid of the linear stages, on the working grid
    smoothing: tuple[float, ...] = (1.0, 0.0)  # Gaussian sigma per level (working voxels)
    rigid_iterations: int = 60  # per level, regular-step gradient descent
    affine_iterations: int = 60
    deformable: bool = True  # B-spline stage after the affine one
    bspline_control_mm: float = 48.0  # control-point spacing of the B-spline grid
    bspline_shrink: tuple[int, ...] = (2, 1)  # pyramid of the deformable stage
    bspline_smoothing: tuple[float, ...] = (1.0, 0.0)
    bspline_iterations: int = 10  # per level, L-BFGS-B
    bspline_sampling: float = 0.05  # share of working voxels sampled in the deformable stage
    max_scale: float = 2.0  # an affine result scaling an axis beyond [1/x, x] is dropped
    threads: int = 2  # SimpleITK's global thread count while registering
    seed: int = 0  # of the metric's random sampling (>= 0; results are repeatable)

    def __post_init__(self) -> None:
        if len(self.shrink) != len(self.smoothing) or not self.shrink:
            raise ValueError("shrink and smoothing need one entry per pyramid level")
        if len(self.bspline_shrink) != len(self.bspline_smoothing) or not self.bspline_shrink:
            raise ValueError("bspline_shrink and bspline_smoothing need one entry per level")
        if not 0 < self.sampling <= 1:
            raise ValueError(f"sampling must be in (0, 1], got {self.sampling}")
        if self.working_mm <= 0 or self.max_working_voxels < 1:
            raise ValueError("working_mm and max_working_voxels must be positive")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_scale <= 1:
            raise ValueError(f"max_scale must be > 1, got {self.max_scale}")


def to_sitk(array: np.ndarray, spacing: tuple[float, ...]) -> sitk.Image:
    """A float32 SimpleITK image of a bank-grid array (see the module docstring on axes)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    return image


def centre_alignment(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """Translation mapping the query's grid centre onto the reference's."""

    def centre(img: sitk.Image) -> np.ndarray:
        return np.asarray(
            img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()])
        )

    return sitk.TranslationTransform(3, tuple(float(v) for v in centre(moving) - centre(fixed)))


class RegistrationFailure(RuntimeError):
    """Registration ended without a usable transform."""


class Registrar:
    """rigid -> affine -> B-spline of one (fixed, moving) pair under ``settings``."""

    def __init__(self, settings: RegistrationSettings) -> None:
        self.s = settings

    def _method(
        self, shrink: tuple[int, ...], smoothing: tuple[float, ...], sampling: float | None = None
    ) -> sitk.ImageRegistrationMethod:
        s = self.s
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=s.histogram_bins)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        # SimpleITK reads seed 0 as 'seed from the wall clock': shift by one.
        reg.SetMetricSamplingPercentage(sampling or s.sampling, s.seed + 1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetShrinkFactorsPerLevel(list(shrink))
        reg.SetSmoothingSigmasPerLevel(list(smoothing))
        return reg

    def _metric(self, fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
        """Mattes MI of the pair under ``transform``, unsmoothed on their grid (lower is better)."""
        reg = self._method((1,), (0.0,))
        reg.SetInitialTransform(transform, inPlace=False)
        return float(reg.MetricEvaluate(fixed, moving))

    def _linear(
        self,
        fixed: sitk.Image,
        moving: sitk.Image,
        transform: sitk.Transform,
        iterations: int,
    ) -> sitk.Transform:
        reg = self._method(self.s.shrink, self.s.smoothing)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0,
            minStep=1e-3,
            numberOfIterations=iterations,
            relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-6,
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetInitialTransform(transform, inPlace=True)
        reg.Execute(fixed, moving)
        return transform

    def _bspline(
        self, fixed: sitk.Image, moving: sitk.Image, linear: sitk.Transform
    ) -> sitk.Transform:
        s = self.s
        extent = [n * sp for n, sp in zip(fixed.GetSize(), fixed.GetSpacing(), strict=True)]
        mesh = [max(1, round(e / s.bspline_control_mm)) for e in extent]
        bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
        reg = self._method(s.bspline_shrink, s.bspline_smoothing, s.bspline_sampling)
        reg.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=1e-5,
            numberOfIterations=s.bspline_iterations,
            maximumNumberOfCorrections=5,
            maximumNumberOfFunctionEvaluations=2 * s.bspline_iterations,
            costFunctionConvergenceFactor=1e7,
        )
        # x (query) -> x + d(x) -> linear(...) (reference): the B-spline is applied first.
        reg.SetMovingInitialTransform(linear)
        reg.SetInitialTransform(bspline, inPlace=True)
        reg.Execute(fixed, moving)
        return sitk.CompositeTransform([linear, bspline])

    def _degenerate(self, affine: sitk.AffineTransform) -> str | None:
        """Why an affine result is unusable (folded, collapsed, non-finite), or None."""
        matrix = np.asarray(affine.GetMatrix()).reshape(3, 3)
        if not np.all(np.isfinite(matrix)) or not np.all(np.isfinite(affine.GetTranslation())):
            return "non-finite affine transform"
        singular = np.linalg.svd(matrix, compute_uv=False)
        lo, hi = 1 / self.s.max_scale, self.s.max_scale
        if singular.min() < lo or singular.max() > hi or np.linalg.det(matrix) <= 0:
            return (
                f"axis scales {np.round(singular, 3).tolist()} outside "
                f"[{lo:.3g}, {hi:.3g}] or a reflection"
            )
        return None

    def register(self, fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.Transform, list[str]]:
        """The transform (query point -> reference point) and the stages kept."""
        for role, image in (("query", fixed), ("reference", moving)):
            values = sitk.GetArrayViewFromImage(image)
            if not np.isfinite(values).all():
                raise RegistrationFailure(f"the {role} image has non-finite voxels")
            if np.ptp(values) == 0:
                raise RegistrationFailure(f"the {role} image is constant: nothing to register")
        start = centre_alignment(fixed, moving)
        offset = start.GetOffset()
        centre = fixed.TransformContinuousIndexToPhysicalPoint(
            [(n - 1) / 2 for n in fixed.GetSize()]
        )
        rigid = sitk.Euler3DTransform()
        rigid.SetCenter(centre)
        rigid.SetTranslation(offset)
        best = self._metric(fixed, moving, start)
        if not math.isfinite(best):
            raise RegistrationFailure("the metric is not finite at the centre alignment")
        current: sitk.Transform = start
        kept = ["centre"]

        self._linear(fixed, moving, rigid, self.s.rigid_iterations)
        affine = sitk.AffineTransform(3)
        affine.SetCenter(centre)
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        value = self._metric(fixed, moving, rigid)
        if math.isfinite(value) and value <= best:
            best, current = value, sitk.AffineTransform(affine)
            kept.append("rigid")
        else:
            affine.SetMatrix((1, 0, 0, 0, 1, 0, 0, 0, 1))
            affine.SetTranslation(offset)

        self._linear(fixed, moving, affine, self.s.affine_iterations)
        degenerate = self._degenerate(affine)
        value = self._metric(fixed, moving, affine) if degenerate is None else math.inf
        if degenerate is None and math.isfinite(value) and value <= best:
            best, current = value, affine
            kept.append("affine")
        elif degenerate is not None:  # kept out, the rigid result goes on
            kept.append(f"affine rejected: {degenerate}")

        if self.s.deformable:
            deformed = self._bspline(fixed, moving, current)
            finite = np.isfinite(deformed.GetNthTransform(1).GetParameters()).all()
            value = self._metric(fixed, moving, deformed) if finite else math.inf
            if math.isfinite(value) and value <= best:
                best, current = value, deformed
                kept.append("bspline")
            elif not finite:
                kept.append("bspline rejected: non-finite parameters")
        return current, kept


def working_image(image: sitk.Image, working_mm: float, max_voxels: int) -> sitk.Image:
    """``image`` bin-averaged to about ``working_mm`` per axis (never finer than it is),
    coarser where that would leave more than ``max_voxels`` (registration time is
    about proportional to the working voxels)."""
    size, spacing = image.GetSize(), image.GetSpacing()
    target = working_mm
    while True:
        factors = [min(n, max(1, round(target / sp))) for n, sp in zip(size, spacing, strict=True)]
        voxels = math.prod(n // f for n, f in zip(size, factors, strict=True))
        if voxels <= max_voxels or factors == list(size):
            break
        target *= 1.25
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive (lo, hi) voxel indices of a mask's foreground, or None when it is empty."""
    axes = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != i))) for i in range(3)]
    if any(len(a) == 0 for a in axes):
        return None
    return np.array([a[0] for a in axes]), np.array([a[-1] for a in axes])


class RegistrationBaseline:
    """k-shot atlas segmentation; the in-context evaluation runs it like a network.

    ``segment`` yields one task at a time: the mean of the reference masks warped
    onto the query (float32 probabilities; the evaluation thresholds at 0.5).
    Registration runs on working copies of both images (``working_mm``); the masks
    are warped at the query's full resolution. Every transform is sampled once per
    pair on the query's working grid: as a displacement field (smooth at the
    control-point spacing, so linear interpolation of it is exact to a small fraction
    of a voxel), which makes each further mask a cheap resample, and as the reference
    point of each working voxel, which bounds the query region a mask can land in, so
    only that box is resampled (a small structure in a large scan costs little).
    """

    label: str = "registration"
    crop: int | None = None
    FIELDS_KEPT = 8  # displacement fields held at once (a few MB each)

    def __init__(self, settings: RegistrationSettings | None = None) -> None:
        self.settings = settings or RegistrationSettings()
        self.config: dict = {"method": "registration", **asdict(self.settings)}
        self._registrar = Registrar(self.settings)
        self._transforms: dict[tuple[str, str], sitk.Transform] = {}
        self._pairs: OrderedDict[tuple[str, str], tuple[sitk.Transform, np.ndarray]] = OrderedDict()
        self._working: dict[str, sitk.Image] = {}
        self.registrations = 0  # pairs registered (a cache hit does not count)
        self.seconds_registering = 0.0
        self.fallbacks: list[dict] = []  # {reference, query, reason}
        self.stages: dict[tuple[str, str], list[str]] = {}

    def _work(self, scan: LabelledScan) -> sitk.Image:
        if scan.scan_id not in self._working:
            full = to_sitk(scan.image, scan.spacing)
            self._working[scan.scan_id] = working_image(
                full, self.settings.working_mm, self.settings.max_working_voxels
            )
        return self._working[scan.scan_id]

    @staticmethod
    def _grid(scan: LabelledScan) -> sitk.Image:
        """An empty image with the scan's full-resolution geometry (a resampling target)."""
        grid = sitk.Image([int(n) for n in reversed(scan.image.shape)], sitk.sitkUInt8)
        grid.SetSpacing(tuple(float(s) for s in reversed(scan.spacing)))
        return grid

    def _register(self, reference: LabelledScan, query: LabelledScan) -> sitk.Transform:
        try:
            fixed, moving = self._work(query), self._work(reference)
        except (RuntimeError, ValueError) as exc:
            raise RegistrationFailure(f"could not prepare the images: {exc}") from exc
        transform, kept = self._registrar.register(fixed, moving)
        self.stages[(reference.scan_id, query.scan_id)] = kept
        return transform

    def transform(self, reference: LabelledScan, query: LabelledScan) -> sitk.Transform:
        """Query point -> reference point, registered once per (reference, query)."""
        key = (reference.scan_id, query.scan_id)
        if key in self._transforms:
            return self._transforms[key]
        t0 = time.perf_counter()
        threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(self.settings.threads)
        try:
            transform = self._register(reference, query)
        except (RuntimeError, ValueError) as exc:  # SimpleITK raises RuntimeError
            reason = " ".join(str(exc).split())[:300]
            self.fallbacks.append(
                {"reference": reference.scan_id, "query": query.scan_id, "reason": reason}
            )
            transform = centre_alignment(self._grid(query), self._grid(reference))
            self.stages[key] = ["centre (fallback)"]
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        self.seconds_registering += time.perf_counter() - t0
        self.registrations += 1
        self._transforms[key] = transform
        return transform

    def _sampled(self, reference: LabelledScan, query: LabelledScan):
        """(transform to resample with, reference points of the query's working voxels).

        The points are an array over the working grid (numpy axis order) of physical
        points in SimpleITK's axis order; a non-linear transform comes back as a
        displacement field on the same grid.
        """
        key = (reference.scan_id, query.scan_id)
        if key not in self._pairs:
            transform = self.transform(reference, query)
            work = self._work(query)
            field = sitk.TransformToDisplacementField(
                transform,
                sitk.sitkVectorFloat64,
                work.GetSize(),
                work.GetOrigin(),
                work.GetSpacing(),
                work.GetDirection(),
            )
            disp = sitk.GetArrayFromImage(field).astype(np.float32)
            shape = disp.shape[:3]
            origin, spacing = work.GetOrigin(), work.GetSpacing()
            for c in range(3):  # SimpleITK component c runs along numpy axis 2 - c
                axis = np.arange(shape[2 - c], dtype=np.float32) * spacing[c] + origin[c]
                disp[..., c] += axis.reshape([-1 if a == 2 - c else 1 for a in range(3)])
            if isinstance(transform, sitk.CompositeTransform):
                transform = sitk.DisplacementFieldTransform(field)  # takes the field over
            self._pairs[key] = (transform, disp)
            while len(self._pairs) > self.FIELDS_KEPT:
                self._pairs.popitem(last=False)
        self._pairs.move_to_end(key)
        return self._pairs[key]

    def _query_box(
        self, points: np.ndarray, lo_mm: np.ndarray, hi_mm: np.ndarray, query: LabelledScan
    ) -> tuple[slice, ...] | None:
        """Query voxels whose reference point can fall in [lo_mm, hi_mm] (SimpleITK order)."""
        inside = np.all((points >= lo_mm) & (points <= hi_mm), axis=-1)
        box = _bounds(inside)
        if box is None:
            return None
        work_spacing = np.asarray(self._work(query).GetSpacing()[::-1])
        factors = np.rint(work_spacing / np.asarray(query.spacing)).astype(int)
        shape = np.asarray(query.image.shape)
        lo = np.clip((box[0] - 1) * factors, 0, shape)  # one working voxel of slack
        hi = np.clip((box[1] + 2) * factors, 0, shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))

    def warp_mask(self, reference: LabelledScan, value: int, query: LabelledScan) -> np.ndarray:
        """The reference's mask of ``value`` in the query grid, linearly interpolated.

        Only the box of query voxels that can reach the mask is resampled (the rest is
        exactly 0): the mask's bounding box, widened by the distance a working voxel's
        worth of query space can stretch to (``working_mm`` x ``max_scale``), decides it.
        """
        out = np.zeros(query.image.shape, np.float32)
        mask = reference.mask(value)
        bounds = _bounds(mask)
        if bounds is None:
            return out
        sampler, points = self._sampled(reference, query)
        ref_spacing = np.asarray(reference.spacing)
        pad = 2  # voxels of background around the cropped mask: interpolation sees zeros
        lo = np.maximum(bounds[0] - pad, 0)
        hi = np.minimum(bounds[1] + pad + 1, mask.shape)
        crop = mask[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))]
        image = to_sitk(crop, reference.spacing)
        image.SetOrigin(tuple(float(v) for v in (lo * ref_spacing)[::-1]))
        reach = self._work(query).GetSpacing()
        margin = max(reach) * self.settings.max_scale + float(ref_spacing.max())
        lo_mm = (bounds[0] * ref_spacing)[::-1] - margin
        hi_mm = (bounds[1] * ref_spacing)[::-1] + margin
        box = self._query_box(points, lo_mm, hi_mm, query)
        if box is None:
            return out
        size = [b.stop - b.start for b in box][::-1]
        origin = [b.start * s for b, s in zip(box, query.spacing, strict=True)][::-1]
        warped = sitk.Resample(
            image,
            size,
            sampler,
            sitk.sitkLinear,
            tuple(float(v) for v in origin),
            tuple(float(v) for v in reversed(query.spacing)),
            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
            0.0,
            sitk.sitkFloat32,
        )
        out[box] = sitk.GetArrayViewFromImage(warped)
        return out

    def segment(
        self, query: LabelledScan, tasks: list[tuple[StructureClass, list[LabelledScan]]]
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Per task: ([index], (1, *query.image.shape)) mean of the warped reference masks."""
        for i, (cls, refs) in enumerate(tasks):
            fused = np.zeros(query.image.shape, np.float32)
            for ref in refs:
                fused += self.warp_mask(ref, cls.value, query)
            fused /= max(len(refs), 1)
            yield [i], np.clip(fused, 0.0, 1.0)[None]

    def stats(self) -> dict:
        """What a results file records about the runs: counts, time, fallbacks."""
        return {
            "registrations": self.registrations,
            "seconds_registering": self.seconds_registering,
            "seconds_per_registration": (
                self.seconds_registering / self.registrations if self.registrations else None
            ),
            "fallbacks": len(self.fallbacks),
            "fallback_cases": list(self.fallbacks),
        }
