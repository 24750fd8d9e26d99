"""The ``enn-neuro`` command: demo, validate, cv, train, predict, evaluate, ui.

Each subcommand is a thin layer over the library. Errors a user can fix (a bad config, a
broken cohort, a study that exists) end the command with one clear message and a non-zero
exit code, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from enn_neuro.runtime import MALLOC_ENV, retain_freed_memory

__all__ = ["main"]

logger = logging.getLogger("enn_neuro")

DEMO_SUBJECTS = 100
DEMO_EFFECT_SIZE = 2.5  # balanced accuracy 0.92 over 5 folds; 0.77 at 1.5 (README)
EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 3


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    if retain_freed_memory():  # steps reuse their memory instead of faulting it in anew
        logger.debug("glibc's malloc keeps freed memory (%s=system to leave it)", MALLOC_ENV)

    from enn_neuro.config import ConfigError
    from enn_neuro.data.cohort import CohortError
    from enn_neuro.data.splits import LeakageError
    from enn_neuro.training.learner import NonFiniteLossError
    from enn_neuro.training.study import StudyError

    try:
        return args.handler(args) or 0
    except NonFiniteLossError as err:
        logger.debug("traceback", exc_info=True)  # shown with --verbose
        print(f"error: training stopped: {err}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    except (
        ConfigError,
        CohortError,
        StudyError,
        LeakageError,
        FileNotFoundError,
        ValueError,
        NotImplementedError,
    ) as err:
        logger.debug("traceback", exc_info=True)  # shown with --verbose
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: resume with --resume", file=sys.stderr)
        return 130
    except Exception as err:  # anything else still ends in one line; -v shows where
        logger.debug("traceback", exc_info=True)
        if _is_mlflow_error(err):  # an unknown run id, an unreachable server, ...
            print(f"error: MLflow: {_first_line(err.message)}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"error: {_root_cause(err)} (run with -v for the traceback)", file=sys.stderr)
        return 1


# subcommands


def _demo(args: argparse.Namespace) -> int:
    from enn_neuro.config import load_config
    from enn_neuro.data.demo import write_demo_cohort
    from enn_neuro.training.study import run_study

    workdir = Path(args.workdir)
    cohort_dir = workdir / "cohort"
    if not (cohort_dir / "participants.tsv").exists():
        logger.info("writing the demo cohort (%d subjects) to %s", args.subjects, cohort_dir)
        write_demo_cohort(
            cohort_dir, n_subjects=args.subjects, seed=args.seed, effect_size=args.effect_size
        )
    overrides = [
        f"data.cohort={cohort_dir}",
        f"study.output_dir={workdir / 'runs'}",
        f"data.cache_dir={workdir / 'cache'}",
        *args.set,
    ]
    config = load_config(args.config or _packaged_config("demo.yaml"), overrides)
    config = _with_tracking_uri(
        config, args.tracking_uri, default=f"sqlite:///{workdir / 'mlflow.db'}"
    )
    result = run_study(config, resume=args.resume)
    _print_summary(result.summary, config.tracking.tracking_uri)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from enn_neuro.config import load_config
    from enn_neuro.data.cohort import load_cohort
    from enn_neuro.data.validation import validate_cohort

    if args.config:
        config = load_config(args.config, args.set)
        if config.pipeline == "images2d":
            return _validate_images(config)
        data = config.data
        cohort = load_cohort(data.cohort, data.target, data.task, data.classes, data.image_column)
        folds = None if data.split_table else data.n_folds  # as the study checks it
    else:
        if not args.cohort or not args.target:
            raise ValueError("give a cohort and --target, or --config")
        cohort = load_cohort(args.cohort, args.target, args.task)
        folds = args.folds
    report = validate_cohort(cohort, n_folds=folds)
    print(report.summary())
    return 0 if report.ok else 1


def _validate_images(config) -> int:
    """Reads every image of a 2D study's train/ and val/ folders once; lists the bad ones."""
    from enn_neuro.data.images2d import check_images, scan_image_folder

    problems, counts = [], []
    for part in ("train", "val"):
        samples, classes = scan_image_folder(config.data.root / part)
        problems += check_images([path for path, _ in samples])
        counts.append(f"{part}: {len(samples)} images in {len(classes)} classes")
    print(f"{config.data.root}: " + "; ".join(counts))
    print(f"problems: {len(problems)}")
    for problem in problems:
        print(f"  - {problem}")
    return 0 if not problems else 1


def _cv(args: argparse.Namespace, folds: Sequence[int] | None = None) -> int:
    from enn_neuro.config import load_config
    from enn_neuro.training.study import run_study

    config = _with_tracking_uri(load_config(args.config, args.set), args.tracking_uri)
    result = run_study(config, resume=args.resume, folds=folds)
    _print_summary(result.summary, config.tracking.tracking_uri)
    return 0


def _train(args: argparse.Namespace) -> int:
    return _cv(args, folds=[args.fold])


def _predict(args: argparse.Namespace) -> int:
    from enn_neuro.training.inference import load_trained_model, per_subject, predict_images

    trained = load_trained_model(args.checkpoint, args.run_id, args.tracking_uri)
    if trained.is_2d:
        images, subjects, sessions = _image_inputs(args.inputs)
    else:
        images, subjects, sessions = _inputs(args.inputs, args)
    frame = predict_images(
        trained, images, subjects, batch_size=args.batch_size, session_ids=sessions
    )
    rows = "images"
    if not args.per_image and not trained.is_2d:  # a 2D image is its own subject
        frame, rows = per_subject(frame, trained), "subjects"
    _write_predictions(frame, trained, args)
    print(f"wrote predictions for {len(frame)} {rows} to {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from enn_neuro.data.cohort import load_cohort
    from enn_neuro.data.validation import validate_cohort
    from enn_neuro.training.inference import (
        evaluate_cohort,
        evaluate_image_folder,
        load_trained_model,
    )

    trained = load_trained_model(args.checkpoint, args.run_id, args.tracking_uri)
    if trained.is_2d:
        frame, metrics = evaluate_image_folder(trained, args.cohort, batch_size=args.batch_size)
        if args.out:
            _write_predictions(frame, trained, args)
        print(json.dumps(metrics, indent=2))
        return 0
    if not args.target:
        raise ValueError("evaluate on a cohort needs --target, the column of true labels")
    cohort = load_cohort(
        args.cohort, args.target, trained.task, trained.classes or None, args.image_column
    )
    validate_cohort(cohort, n_folds=None).raise_if_problems()
    frame, metrics = evaluate_cohort(trained, cohort, batch_size=args.batch_size)
    if args.out:
        _write_predictions(frame, trained, args)
    print(json.dumps(metrics, indent=2))
    return 0


def _ui(args: argparse.Namespace) -> int:
    command = ui_command(args.tracking_uri, args.port)
    store = command[command.index("--backend-store-uri") + 1]
    print(f"MLflow UI on http://127.0.0.1:{args.port} (store: {store})")
    os.execvp(command[0], command)
    return 0  # not reached


def ui_command(tracking_uri: str | None, port: int) -> list[str]:
    """The ``mlflow ui`` command line, bound to the loopback interface only.

    MLflow runs as a module of this interpreter: ``.venv/bin/enn-neuro`` started without
    the virtual environment on ``PATH`` would find no ``mlflow`` executable.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


# helpers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enn-neuro",
        description="Eigen Neural Networks for 3D brain MRI: validate cohorts, run "
        "cross-validated studies in bp or local mode, predict, and compare runs in MLflow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def study_options(
        command: argparse.ArgumentParser, default_store: str = "sqlite:///mlflow.db"
    ) -> None:
        command.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)",
        )
        command.add_argument(
            "--resume",
            action="store_true",
            help="continue a killed study from its last checkpoints, in the same MLflow runs",
        )
        command.add_argument(
            "--tracking-uri",
            help="MLflow tracking URI (default: the config's, then MLFLOW_TRACKING_URI, "
            f"then {default_store})",
        )

    demo = commands.add_parser(
        "demo",
        help="write the synthetic demo cohort and run a small CV study on it",
        description="Writes a synthetic BIDS cohort built from the MNI152 template (once) and "
        "runs the demo study on it: cross-validation, MLflow tracking, a summary at the end.",
    )
    demo.add_argument(
        "--workdir", default="enn-demo", help="folder for cohort, cache, runs and mlflow.db"
    )
    demo.add_argument(
        "--subjects", type=int, default=DEMO_SUBJECTS, help="subjects of the demo cohort"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the demo cohort")
    demo.add_argument(
        "--effect-size",
        type=float,
        default=DEMO_EFFECT_SIZE,
        help="size of the patient effect in the demo cohort (0: none)",
    )
    demo.add_argument("--config", help="study config (default: the packaged demo.yaml)")
    study_options(demo, default_store="sqlite:///<workdir>/mlflow.db")
    demo.set_defaults(handler=_demo)

    validate = commands.add_parser(
        "validate",
        help="pre-flight check of a cohort: every problem, before any training",
        description="Reads every header and volume once and reports every problem found, naming "
        "subject and file. Exit code 0 when the cohort is clean, 1 otherwise.",
    )
    validate.add_argument("cohort", nargs="?", help="cohort table (.csv/.tsv) or BIDS folder")
    validate.add_argument("--target", help="target column")
    validate.add_argument(
        "--task",
        default="classification",
        choices=["classification", "regression"],
        help="what the target is (default classification: labels and class counts checked)",
    )
    validate.add_argument(
        "--folds", type=int, default=5, help="planned folds (class counts are checked)"
    )
    validate.add_argument(
        "--config", help="take cohort, target, task and folds from a study config"
    )
    validate.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    validate.set_defaults(handler=_validate)

    cv = commands.add_parser(
        "cv",
        help="run a cross-validated study from a config",
        description="Validates the config and cohort, makes subject-level folds, trains every "
        "fold (model selection on validation subjects only) and summarises test metrics with "
        "95% confidence intervals. Tracked in MLflow: a parent run, a child run per fold.",
    )
    cv.add_argument("config", help="study config (YAML)")
    study_options(cv)
    cv.set_defaults(handler=_cv)

    train = commands.add_parser(
        "train",
        help="train and test one split of a study",
        description="Like cv, for one fold only: the study's folder, splits and parent run "
        "are those of cv, so the folds of one study can run as separate jobs. The first job "
        "creates the study; every later one (another --fold) adds --resume. The parent run's "
        "summary covers the folds finished so far.",
    )
    train.add_argument("config", help="study config (YAML)")
    train.add_argument("--fold", type=int, default=0, help="which fold (default 0)")
    study_options(train)
    train.set_defaults(handler=_train)

    def model_source(command: argparse.ArgumentParser) -> None:
        source = command.add_mutually_exclusive_group(required=True)
        source.add_argument("--checkpoint", help="a best.pt from a study folder")
        source.add_argument("--run-id", help="an MLflow fold run that logged the model")
        command.add_argument("--tracking-uri", help="MLflow tracking URI of --run-id")
        command.add_argument(
            "--batch-size", type=int, default=4, help="images per forward pass (default 4)"
        )

    def all_probabilities(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--all-probabilities",
            action="store_true",
            help="one prob_<class> column per class however many classes; by default a model "
            "of more than 100 classes (ImageNet) writes its top 5 classes and their "
            "probabilities instead",
        )

    predict = commands.add_parser(
        "predict",
        help="apply a trained model to NIfTI files or a cohort",
        description="Writes one row per subject (or per image with --per-image): subject, "
        "the number of images (per image: session and image), prediction and class "
        "probabilities (classification) or the predicted value (regression). Inputs are NIfTI "
        "files (subject and session from BIDS names such as sub-01_ses-1_T1w.nii.gz, else the "
        "file name), one cohort table (its subject_id and image columns; no target needed) or "
        "one BIDS folder. A 2D image model writes one row per image, for image files or "
        "every image below one folder.",
    )
    model_source(predict)
    predict.add_argument(
        "inputs",
        nargs="+",
        help="3D models: NIfTI files, a cohort table, or a BIDS folder; 2D models: image "
        "files or one folder (every image below it)",
    )
    predict.add_argument("--out", default="predictions.csv", help="CSV to write")
    all_probabilities(predict)
    predict.add_argument(
        "--target",
        help="a column the cohort table must have (not used; by default none is required)",
    )
    predict.add_argument(
        "--image-column", default="image", help="image path column of a cohort table"
    )
    rows = predict.add_mutually_exclusive_group()
    rows.add_argument(
        "--per-subject",
        dest="per_image",
        action="store_false",
        help="one row per subject, the default: probabilities (or values) averaged over the "
        "subject's images, as the studies score subjects",
    )
    rows.add_argument(
        "--per-image", dest="per_image", action="store_true", help="one row per image instead"
    )
    predict.set_defaults(handler=_predict, per_image=False)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a trained model on a labelled cohort",
        description="Predicts every image of a labelled cohort and prints subject-level "
        "metrics as JSON. A 2D image model scores an image folder laid out as "
        "<folder>/<class>/<images> instead, one image per row.",
    )
    model_source(evaluate)
    evaluate.add_argument(
        "cohort",
        help="cohort table or BIDS folder with the target column (3D models), or an image "
        "folder with one subfolder per class (2D models)",
    )
    evaluate.add_argument("--target", help="target column of the cohort (3D models)")
    evaluate.add_argument(
        "--image-column", default="image", help="image path column of a cohort table"
    )
    evaluate.add_argument("--out", help="also write per-image predictions to this CSV")
    all_probabilities(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    ui = commands.add_parser(
        "ui",
        help="open the MLflow UI on the study's store (127.0.0.1 only)",
        description="Starts `mlflow ui` on the tracking store, bound to 127.0.0.1.",
    )
    ui.add_argument(
        "--tracking-uri", help="store to show (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    ui.set_defaults(handler=_ui)
    return parser


def _inputs(
    inputs: Sequence[str], args: argparse.Namespace
) -> tuple[list[str], list[str] | None, list[str | None] | None]:
    """Images, subjects and sessions: NIfTI paths (subjects from file names) or one cohort."""
    if len(inputs) == 1 and (Path(inputs[0]).is_dir() or inputs[0].endswith((".csv", ".tsv"))):
        from enn_neuro.data.cohort import load_cohort

        # the target is not used: ask only for a column every cohort of that kind has
        target = args.target or ("participant_id" if Path(inputs[0]).is_dir() else "subject_id")
        cohort = load_cohort(inputs[0], target, "classification", None, args.image_column)
        records = cohort.records
        return (
            [str(r.image) for r in records],
            [r.subject_id for r in records],
            [r.session_id for r in records],
        )
    missing = [p for p in inputs if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"input image(s) not found: {missing}")
    return list(inputs), None, None


def _image_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str] | None, None]:
    """Images for a 2D model: files, or every image below one folder (ids relative to it)."""
    from enn_neuro.data.images2d import find_images

    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        root = Path(inputs[0])
        images = find_images(root)
        return [str(p) for p in images], [str(p.relative_to(root)) for p in images], None
    missing = [p for p in inputs if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"input image(s) not found: {missing}")
    return list(inputs), None, None


def _with_tracking_uri(config, tracking_uri: str | None, default: str | None = None):
    """Sets the store a study logs to: ``--tracking-uri``, the config's, else ``default``.

    ``MLFLOW_TRACKING_URI`` is left where it is, in the environment, for the tracker to read:
    copied into the config it would be saved with every run (params, ``config.yaml``), and
    a server's address may carry credentials.
    """
    uri = tracking_uri or config.tracking.tracking_uri
    if not uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        uri = default
    if uri:
        config.tracking.tracking_uri = uri
    return config


def _packaged_config(name: str) -> Path:
    return Path(str(resources.files("enn_neuro") / "configs" / name))


def _write_predictions(frame, trained, args: argparse.Namespace) -> None:
    """Writes ``frame`` to ``--out``: beyond 100 classes, the top five unless asked for all."""
    from enn_neuro.files import write_text_atomic
    from enn_neuro.training.inference import compact_probabilities

    if trained.task == "classification" and not args.all_probabilities:
        frame = compact_probabilities(frame, trained.classes)
    write_text_atomic(args.out, frame.to_csv(index=False))


def _print_summary(summary: dict, tracking_uri: str | None) -> None:
    folds = max((values["n"] for values in summary.values()), default=0)
    if folds > 1:
        print(f"test metrics over {folds} folds (mean, 95% CI):")
    else:
        print("test metrics (one split: no interval):")
    for name, values in summary.items():
        if name.startswith("test/") and "block" not in name and name != "test/loss":
            interval = f" [{values['ci_low']:.3f}, {values['ci_high']:.3f}]" if folds > 1 else ""
            print(f"  {name.removeprefix('test/'):<18} {values['mean']:.3f}{interval}")
    store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    print(f"compare runs with: enn-neuro ui --tracking-uri {store}")


def _is_mlflow_error(err: BaseException) -> bool:
    exceptions = sys.modules.get("mlflow.exceptions")  # only loaded if MLflow was used
    return exceptions is not None and isinstance(err, exceptions.MlflowException)


def _root_cause(err: BaseException) -> str:
    """The innermost cause's type and first line.

    MONAI, for one, wraps a transform's error (which names the file) in
    ``RuntimeError("applying transform ...")``.
    """
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {_first_line(str(err))}"


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("mlflow", "alembic", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
