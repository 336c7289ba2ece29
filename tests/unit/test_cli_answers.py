"""What the CLI prints for an answer (`perito classify`, `perito job results`): beside the
classes, whatever a person acting on it must know (unsure, a poor photo, one frame of many)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from perito import Classification, JobItemResult, Quality
from perito._cli import _notes, _result_row
from perito.v1.vocabulary import ItemState, Prediction


def _answer(
    uncertain: bool = False, issues: tuple[str, ...] = (), first_frame_only: bool = False
) -> Classification:
    quality = Quality(3.0, 0.6, 0.0, 20.0, 11.0, 640, 480, 2.1, issues=list(issues))
    return Classification(
        "IMG_0001.jpg",
        [Prediction("dent", 0, 0.912), Prediction("scratch", 1, 0.05)],
        margin=0.86,
        normalized_entropy=0.2,
        uncertain=uncertain,
        first_frame_only=first_frame_only,
        quality=quality,
    )


def test_a_confident_answer_on_a_good_photo_has_nothing_beside_it() -> None:
    assert _notes(_answer(), "uncertain") == ""
    assert _notes(dataclasses.replace(_answer(), quality=None), "uncertain") == ""


def test_a_poor_photo_and_an_unsure_model_are_both_said() -> None:
    notes = _notes(
        _answer(uncertain=True, issues=("BLURRY", "UNDEREXPOSED"), first_frame_only=True),
        "uncertain",
    )
    assert notes == "  [uncertain]  [poor photo: BLURRY, UNDEREXPOSED]  [first frame only]"


def test_a_job_results_row_says_the_photo_was_poor() -> None:
    item = JobItemResult(
        7,
        "IMG_0001.jpg",
        "s3://b/IMG_0001.jpg",
        ItemState.SUCCEEDED,
        _answer(issues=("BLURRY",)),
        "",
    )
    assert _result_row(item) == "     7  IMG_0001.jpg  dent  91.20%  [poor photo: BLURRY]"
    failed = JobItemResult(
        8, "x.txt", "s3://b/x.txt", ItemState.FAILED, None, "NOT_AN_IMAGE: not an image"
    )
    assert _result_row(failed) == "     8  x.txt  FAILED  NOT_AN_IMAGE: not an image"


RECIPE = Path(__file__).resolve().parents[2] / "training" / "recipes" / "fashion-mnist.yaml"


def test_what_the_cli_cannot_take_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from perito._cli import EXIT_USAGE, cli

    runner = CliRunner()
    photo = tmp_path / "one.jpg"
    photo.write_bytes(b"x")
    for args, said in (
        (["submit", str(tmp_path / "*.png"), "--model", "tiny"], "not a folder, a manifest"),
        (["submit", str(photo), "--model", "tiny"], "not a folder, a manifest"),
        (["models", "list", "--server", "http://127.0.0.1:8500"], "without a scheme"),
        (["train", str(RECIPE), "--forms", "fp32"], "add --publish"),
        (["models", "list", "--server", "127.0.0.1"], "127.0.0.1:8500"),
        (["models", "list", "--server", "perito.internal"], "port 443"),
        (["health", "--server", "[::1]"], "with the port"),
        (["models", "list", "--timeout", "nan"], "seconds over 0"),
        (["models", "list", "--timeout", "0"], "seconds over 0"),
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert said in result.output and "Traceback" not in result.output, result.output


def test_a_server_named_with_its_port_or_in_grpcs_own_forms_is_taken() -> None:
    import click

    from perito._cli import _check_server

    for server in (
        "localhost:8500",
        "10.0.0.7:443",
        "[::1]:8500",
        "dns:///perito.internal:8500",
        "unix:///run/perito.sock",
        "ipv4:127.0.0.1:8500",
    ):
        assert _check_server(click.Context(click.Command("x")), None, server) == server  # type: ignore[arg-type]


def test_a_newline_in_an_image_id_cannot_fake_a_line() -> None:
    item = JobItemResult(0, "a.jpg\n     1  b.jpg  dent", "/x", ItemState.SUCCEEDED, _answer(), "")
    assert _result_row(item) == "     0  a.jpg\\n     1  b.jpg  dent  dent  91.20%"


def test_waiting_on_a_job_no_worker_takes_says_so_once_it_has_waited() -> None:
    from perito import Job, JobState
    from perito._cli import QUEUED_HINT_S, queued_hint

    queued = Job("j1", JobState.QUEUED, "m", "1", 5, 0, 0, 0, None, None, None, "", [], "")
    assert queued_hint(queued, QUEUED_HINT_S - 1) is None
    hint = queued_hint(queued, QUEUED_HINT_S + 1)
    assert hint is not None and "no worker has started it" in hint
    running = dataclasses.replace(queued, state=JobState.RUNNING)
    assert queued_hint(running, 600) is None
