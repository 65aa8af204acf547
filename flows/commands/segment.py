"""`maskbank segment`: a network's segmentations of new scans, on each scan's own grid."""

from __future__ import annotations

import argparse
import json
import sys
import time

from maskbank.flows.commands.options import add_workers_option

DESCRIPTION = """\
Segment new scans with a pretrained in-context network and one or more labelled
references (--reference IMAGE MASK, repeatable), with a saved task (--task FILE), or
with a fine-tuned network (--checkpoint DIR from `maskbank evaluate finetune
--save-model DIR`, no references needed).

QUERY is what `maskbank prepare` takes: scan files (.nii/.nii.gz/.nrrd/.mha/.mhd), DICOM
series folders, folders (searched recursively; *_label/_seg/_mask files are not
queries) or a .csv/.jsonl manifest (column image; modality, dicom_series). Each query is
read, reoriented and resampled to the network's spacing and normalised as the
pretraining bank's scans were, segmented by sliding windows, thresholded per label at the
step of 0.5 ... 0.95 that best fits its references' own masks when the references are
segmented like queries (--threshold reference, the default; a task file saved by such a
run keeps the thresholds, one made without them cuts at 0.5), and mapped back onto the
query's own grid and affine. As in `maskbank evaluate incontext`,
each structure is segmented at the scale that frames its reference mask
(--reference-zoom fit, the default): a large organ on a coarser grid, then again one
step finer inside that prediction; the label map always has the query's full grid:

  OUT/<id>_seg.nii.gz   label map with the references' label values
  OUT/<id>_seg.json     label names, voxels and volumes per label, provenance
  OUT/<id>_prob.nii.gz  (--save-probabilities) one channel per label, uint8 steps of 1/255

A reference mask may be binary or a label map: --labels picks values (1,3) or names
(with --label-names FILE); each value is one structure, and several references of a
structure are averaged. The network and the task embeddings are loaded once per run (per
worker with --workers/--dask-address). A query that cannot be segmented is listed with
its reason and the others are still written; outputs already made with the same network
and task are skipped, so re-running finishes an interrupted cohort.

The spacing is --spacing, else the task file's or fine-tuned network's, else the
pretraining bank's (the checkpoint records the bank, not the spacing), else 1.5 mm.
"""

EPILOG = """\
exit status: 0 when every query is segmented (or was already); 1 when any query failed
(the others are written; failures are listed with their reasons); 2 for unusable
arguments (checkpoint, references, task file of another network, no queries).

examples:
  maskbank segment --checkpoint runs/base --reference ref.nii.gz ref_liver.nii.gz new_scans/
  maskbank segment --checkpoint runs/base --reference a.nii.gz a_seg.nii.gz \\
      --reference b.nii.gz b_seg.nii.gz --labels liver,spleen --label-names labels.json \\
      --save-task liver_spleen.safetensors --out seg/ cohort.csv
  maskbank segment --checkpoint runs/base --task liver_spleen.safetensors --workers 4 cohort/
  maskbank segment --checkpoint eval/ft/model --save-probabilities dicom_series_folder/
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "segment",
        help="segment new scans with a network and labelled references (or a saved task)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("queries", nargs="+", metavar="QUERY", help="scan file, folder or manifest")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="pretraining run folder or .pt checkpoint, or a fine-tuned model folder",
    )
    p.add_argument(
        "--reference",
        nargs=2,
        action="append",
        metavar=("IMAGE", "MASK"),
        default=None,
        help="a labelled example (repeatable): the image and its mask or label map",
    )
    p.add_argument("--task", default=None, metavar="FILE", help="a task saved with --save-task")
    p.add_argument(
        "--labels",
        default=None,
        metavar="LIST",
        help="label values (1,3) or names (liver,spleen) to segment (default: all the "
        "references' values, or all of the task's)",
    )
    p.add_argument(
        "--label-names",
        default=None,
        metavar="FILE",
        help="names of the references' label values (JSON, ITK-SNAP, FreeSurfer LUT, Slicer)",
    )
    p.add_argument("--out", default="segmentations", metavar="DIR", help="output folder")
    p.add_argument("--save-task", default=None, metavar="FILE", help="write the task embeddings")
    p.add_argument("--save-probabilities", action="store_true", help="also write <id>_prob.nii.gz")
    p.add_argument(
        "--largest-component",
        action="store_true",
        help="keep each label's largest connected component",
    )
    p.add_argument(
        "--reference-zoom",
        choices=("off", "fit"),
        default="fit",
        help="scale-normalised inference, as in `maskbank evaluate incontext`. fit: a label "
        "is segmented on a grid coarse enough that its reference crop shows it whole with "
        "context (its longest extent at most half the crop), but fine enough to keep its "
        "thinnest extent >= 8 voxels; reference and query are averaged down, the "
        "probabilities interpolated back. off: every label on the full grid (default: fit)",
    )
    p.add_argument(
        "--max-zoom",
        type=float,
        default=4.0,
        metavar="S",
        help="coarsest scale --reference-zoom fit may choose, of 1, 1.5, 2, 3, 4 (default 4)",
    )
    p.add_argument(
        "--no-zoom-refine",
        action="store_true",
        help="keep a zoomed label's coarse prediction; by default it is segmented again one "
        "step finer, inside its coarse prediction dilated by two coarse voxels",
    )
    p.add_argument(
        "--threshold",
        choices=("reference", "fixed"),
        default="reference",
        help="reference: each label's threshold is the step of 0.5, 0.6, 0.7, 0.8, 0.9, 0.95 "
        "that best fits its references' masks when the references are segmented like queries "
        "(once per run from --reference pairs; a --task file keeps those it was saved with), "
        "as in `maskbank evaluate incontext`; fixed: >= 0.5 (default: reference)",
    )
    p.add_argument(
        "--threshold-by",
        choices=("volume", "dice"),
        default="volume",
        help="what --threshold reference fits: the volume closest to the reference mask's, "
        "or the best Dice (default: volume)",
    )
    p.add_argument(
        "--calibration-copy",
        choices=("augmented", "plain"),
        default="augmented",
        help="what --threshold reference segments: a gamma-warped, noised copy of each "
        "reference, or the reference as it is (default: augmented)",
    )
    p.add_argument(
        "--spacing",
        default=None,
        metavar="MM",
        help="resample queries to this spacing (one number or three; default: as recorded)",
    )
    p.add_argument(
        "--modality",
        default="auto",
        choices=["auto", "ct", "mr", "pet"],
        help="modality of the queries and references (default: detected; a query whose "
        "modality differs from the task's fails unless this is given)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--window-batch",
        type=int,
        default=None,
        metavar="N",
        help="windows per forward pass (default: 16 for 32^3 windows, 2 from 64^3 up)",
    )
    p.add_argument(
        "--max-scan-memory",
        default=None,
        metavar="SIZE",
        help="per-query memory budget, e.g. 6G: a query whose estimate (header only) is "
        "larger fails before it is read (default: 3/4 of the machine divided by --workers)",
    )
    add_workers_option(p, default=1)
    p.add_argument(
        "--dask-address",
        default=None,
        metavar="ADDR",
        help="run the queries on an existing Dask cluster (workers must see CKPT and --out)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from maskbank.flows.inputs import parse_spacing
    from maskbank.flows.segment import SegmentError, SegmentOptions, SegmentRun
    from maskbank.pipeline.config import default_scan_memory, parse_size

    prog = "maskbank segment"
    try:
        spacing = parse_spacing(args.spacing) if args.spacing else None
        budget = (
            parse_size(args.max_scan_memory)
            if args.max_scan_memory
            else (None if args.dask_address else default_scan_memory(args.workers))
        )
        options = SegmentOptions(
            spacing=spacing,
            modality=args.modality,
            device=args.device,
            window_batch=max(1, args.window_batch) if args.window_batch else None,
            save_probabilities=args.save_probabilities,
            largest_component=args.largest_component,
            max_scan_memory=budget,
            reference_zoom=args.reference_zoom,
            max_zoom=args.max_zoom,
            zoom_refine=not args.no_zoom_refine,
            threshold=args.threshold,
            threshold_by=args.threshold_by,
            calibration_copy=args.calibration_copy,
        )
        started = time.perf_counter()
        seg_run = SegmentRun(
            args.checkpoint,
            args.queries,
            references=[tuple(r) for r in args.reference or []],  # type: ignore[misc]
            task=args.task,
            labels=args.labels,
            label_names=args.label_names,
            out=args.out,
            save_task=args.save_task,
            options=options,
        )
    except (SegmentError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    tasks = seg_run.tasks
    zoomed = {n: s for n, s in zip(tasks.names, tasks.class_scales, strict=True) if s != 1}
    if zoomed:
        print(
            "reference zoom: " + ", ".join(f"{n} at scale {s:g}" for n, s in zoomed.items()),
            file=sys.stderr,
        )
    if seg_run.thresholds is not None:
        cuts = zip(tasks.names, seg_run.thresholds, strict=True)
        print(
            "thresholds calibrated on the references: "
            + ", ".join(f"{n} {t:g}" for n, t in cuts)
            + f" ({seg_run.calibration_seconds:.1f} s)",
            file=sys.stderr,
        )
    print(
        f"{len(seg_run.queries)} queries, {tasks.n_tasks} labels "
        f"({', '.join(f'{v}: {n}' for v, n in zip(tasks.values, tasks.names, strict=True))}) "
        f"at {seg_run.spacing} mm ({seg_run.spacing_source}); network and tasks ready in "
        f"{time.perf_counter() - started:.1f} s -> {args.out}",
        file=sys.stderr,
    )
    if args.save_task:
        print(f"task saved to {args.save_task}", file=sys.stderr)
    return _stream(seg_run, args)


def _stream(seg_run, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    failed, done, skipped = [], 0, 0
    seconds: list[float] = []
    bar = tqdm(
        total=len(seg_run.queries), desc="segment", unit="scan", disable=args.no_progress,
        file=sys.stderr, dynamic_ncols=True,
    )  # fmt: skip
    for result in seg_run.results(args.workers, args.dask_address):
        bar.update(1)
        if result.status == "ok":
            seconds.append(result.seconds)
            bar.set_postfix(s_per_query=f"{sum(seconds) / len(seconds):.1f}")
        if result.status == "failed":
            failed.append(result)
        else:
            done += 1
            skipped += result.status == "skipped"
        if args.json:
            print(json.dumps(result.to_dict()))
        elif result.status == "failed":
            tqdm.write(
                f"FAILED {result.scan_id}: {result.source}: {result.reason}", file=sys.stderr
            )
    bar.close()
    mean = f", {sum(seconds) / len(seconds):.1f} s per query" if seconds else ""
    print(
        f"{done} of {len(seg_run.queries)} queries segmented into {args.out} ({skipped} "
        f"already were){mean}; {len(failed)} failed",
        file=sys.stderr,
    )
    for r in failed:
        print(f"  {r.scan_id}: {r.source}: {r.reason}", file=sys.stderr)
    return 1 if failed else 0
