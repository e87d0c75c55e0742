"""The command line as a new user meets it: help on every flag, no traceback for a closed pipe,
and read commands that write nothing."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _flags_without_help(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _flags_without_help(sub, [*path, name])
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(" ".join([*path, "/".join(action.option_strings) or action.dest]))
    return missing


def test_every_flag_and_argument_of_every_command_has_help() -> None:
    assert _flags_without_help(build_parser(), ["fedrisk"]) == []


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`fedrisk ... | head`: the pipe closes before the command writes; no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "cli.main", "analytics", "check",
                                str(ROOT / "experiments" / "queries" / "delinquency_by_age_insurance.yaml")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # type: ignore[union-attr]
    stderr = process.stderr.read().decode()  # type: ignore[union-attr]
    assert process.wait(timeout=300) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


def test_reading_a_registry_that_is_not_there_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "relaeses"
    for command in (["list"], ["show", "r1"], ["withdraw", "r1", "--reason", "x"]):
        result = subprocess.run([sys.executable, "-m", "cli.main", "release", *command, "--registry", str(typo)],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert f"--registry {typo}: no release registry there" in result.stderr
        assert "Traceback" not in result.stderr
        assert not typo.exists()


def test_a_revocation_names_a_record_and_a_purpose_the_node_has(tmp_path: Path) -> None:
    """A misspelt purpose or a record key that is not in the export is refused, and nothing is
    recorded; a real one is revoked."""
    import pandas as pd

    from clients.node_state import NodeState
    from engines.provisioning import provision_nodes
    from experiments.synthetic import synthesize
    from federation.he_codec import init_keys

    synthesize(1, 600, tmp_path / "data", seed=1)
    keys = init_keys(tmp_path / "keys")
    state = provision_nodes(tmp_path / "data", keys.hospital_context, tmp_path / "nodes",
                            purposes={"credit-risk-research": (1.0, 1e-5)})[0]
    key = str(pd.read_parquet(state.data_file)[state.schema().record_key].iloc[0])

    def revoke(record_key: str, purpose: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", "node", "revoke", "--dir", str(state.directory),
                               "--record-key", record_key, "--purpose", purpose],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    misspelt = revoke(key, "credit-risk-reserch")
    assert misspelt.returncode == 2 and "no consent column of this node's schema covers it" in misspelt.stderr
    unknown = revoke("MRN-00000000-not-here", "credit-risk-research")
    assert unknown.returncode == 2 and "has that record key" in unknown.stderr
    assert "MRN-00000000-not-here" not in unknown.stderr  # what was typed is not echoed
    assert NodeState.load(state.directory).revocations().entries() == []
    assert revoke(key, "credit-risk-research").returncode == 0
    assert len(NodeState.load(state.directory).revocations().entries()) == 1


def test_preflight_warns_of_files_left_out_and_of_a_hospital_too_small_to_train(tmp_path: Path, capsys) -> None:
    from engines.simulation import preflight
    from experiments.synthetic import synthesize
    from federation.config import RunConfig
    from federation.he_codec import init_keys

    synthesize(3, 3_000, tmp_path / "data", seed=2)
    init_keys(tmp_path / "keys")
    config = RunConfig(data_dir=str(tmp_path / "data"), keys_dir=str(tmp_path / "keys"), run_dir=str(tmp_path / "run"),
                       num_hospitals=2, sample_rate=0.01)
    preflight(config)
    err = capsys.readouterr().err
    assert "holds 3 hospital files; using the first 2" in err and "pass --hospitals 3" in err
    assert "expected DP-SGD batch" in err  # 3,000 patients over 3 hospitals: at q = 0.01 a batch of < 10
    assert "MRN-" not in err  # counts and names only
    preflight(config.replace(run_dir=str(tmp_path / "run2"), num_hospitals=3, sample_rate=0.5))
    assert capsys.readouterr().err == ""  # nothing to warn of


def test_preflight_over_provisioned_nodes_validates_only_an_export_that_changed(tmp_path: Path, monkeypatch) -> None:
    """A run on provisioned nodes does not re-validate on the driver an export whose bytes passed
    before (a hash per node, not a validation: 500 hospitals' pre-flight took minutes); an export
    edited since is validated again and refused, naming the file, before any engine starts."""
    import clients.validation as validation
    from engines.provisioning import provision_nodes
    from engines.simulation import preflight
    from experiments.synthetic import synthesize
    from federation.config import RunConfig
    from federation.errors import DataError
    from federation.he_codec import init_keys

    report = synthesize(3, 3_000, tmp_path / "data", seed=2)
    keys = init_keys(tmp_path / "keys")
    provision_nodes(tmp_path / "data", keys.hospital_context, tmp_path / "nodes",
                    purposes={"credit-risk-research": (6.0, 1e-5)})
    validated: list[Path] = []
    real = validation.validate_export
    monkeypatch.setattr(validation, "validate_export",
                        lambda path, schema: validated.append(Path(path)) or real(path, schema))
    config = RunConfig(nodes_dir=str(tmp_path / "nodes"), keys_dir=str(keys.server_context.parent),
                       run_dir=str(tmp_path / "run"), num_hospitals=3, sample_rate=0.5)
    preflight(config)
    assert validated == []  # provisioning validated these bytes: the pre-flight hashed them only
    victim = report.files[1]
    frame = pd.read_csv(victim) if victim.suffix == ".csv" else pd.read_parquet(victim)
    frame.loc[frame.index[0], "age"] = -40  # out of the schema's range
    frame.to_csv(victim, index=False) if victim.suffix == ".csv" else frame.to_parquet(victim, index=False)
    with pytest.raises(DataError, match=victim.name):
        preflight(config)
    assert validated == [victim.resolve()] or validated == [victim]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_start_up_steps_reach_the_display_a_line_per_step_in_a_log() -> None:
    """What the run does before round 1 (provisioning node i of N, the engine, the census) is
    shown: a terminal's description follows it, a log gets one line per step, not per node."""
    import io

    from cli.progress import Working

    steps = [("provision", "provisioning hospital nodes", {"done": i, "total": 3}) for i in range(4)]
    steps += [("engine", "starting Flower's simulation engine", {}), ("census", "3 hospital nodes connected", {}),
              ("train", "round 1/2: DP-SGD training at the hospitals", {"round": 1})]
    log = io.StringIO()
    with Working("training at 3 hospitals", 2, stream=log, terminal=False) as working:
        for key, text, data in steps:
            working.callback("stage", {"stage": key, "text": text, **data})
        working.callback("round", _round(1, 2))
    lines = log.getvalue().splitlines()
    assert [line.split(": ", 1)[1].split(" ")[0] for line in lines[1:5]] == ["provisioning", "starting", "3", "round"]
    assert lines[1].endswith("0/3") and "round 1/2  DP pooled AUC" in lines[5] and len(lines) == 6
    with Working("training at 3 hospitals", 2, stream=io.StringIO(), terminal=True) as working:
        shown = []
        for key, text, data in steps:
            working.callback("stage", {"stage": key, "text": text, **data})
            shown.append(working._progress.tasks[0].description)
    assert shown[3] == "training at 3 hospitals: provisioning hospital nodes 3/3"
    assert shown[-1] == "training at 3 hospitals: round 1/2: DP-SGD training at the hospitals"


def _round(number: int, rounds: int) -> dict:
    from federation.round_evaluation import AUC, BRIER, LOG_LOSS
    from server.tracking import ROUND_EPSILON_MAX, ROUND_SECONDS

    return {"round": number, "rounds": rounds, AUC: 0.8, BRIER: 0.1, LOG_LOSS: 0.3, ROUND_EPSILON_MAX: 0.5 * number,
            ROUND_SECONDS: 1.0}


def test_a_terminal_gets_a_progress_bar_over_the_rounds() -> None:
    import io

    from cli.progress import Working

    screen = io.StringIO()
    with Working("training at 3 hospitals", 2, stream=screen, terminal=True) as working:
        for number in (1, 2):
            working.callback("round", _round(number, 2))
    shown = screen.getvalue()
    assert "round 1/2  DP pooled AUC 0.8000" in shown and "round 2/2" in shown
    assert "2/2" in shown and "━" in shown and "done" in shown  # Rich's bar, full, and the command marked done


def test_a_pipe_gets_plain_lines_and_no_terminal_codes() -> None:
    import io

    from cli.progress import Working

    log = io.StringIO()
    with Working("training at 3 hospitals", 2, stream=log, terminal=False) as working:
        working.callback("round", _round(1, 2))
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("training at 3 hospitals: checking exports and keys") and "round 1/2" in lines[1]
    assert "\x1b[" not in log.getvalue()


def test_flags_follow_one_convention_and_old_spellings_still_work() -> None:
    """A file flag ends in -file, an id can be given the same way everywhere, a run directory is
    --run-dir wherever a command reads one; the spellings of earlier versions still parse."""
    from cli.main import build_parser

    parser = build_parser()
    pairs = [
        (["node", "init", "--dir", "n", "--hospital", "h", "--data", "d", "--key-file", "k", "--budget", "p=1"],
         ["node", "init", "--dir", "n", "--hospital", "h", "--data", "d", "--key", "k", "--budget", "p=1"], "key"),
        (["node", "service-token", "--token-hash-file", "t"], ["node", "service-token", "--token-file", "t"],
         "token_file"),
        (["node", "grant", "revoke", "--dir", "n", "--grant-id", "g"], ["node", "grant", "revoke", "--dir", "n",
                                                                          "--grant", "g"], "grant"),
        (["bank", "score", "--service", "s", "--input", "i", "--output", "o", "--release-id", "r1",
          "--api-key-file", "k"],
         ["bank", "score", "--service", "s", "--input", "i", "--output", "o", "--release", "r1", "--key-file", "k"],
         "release"),
        (["run", "--keys", "k", "--data", "d", "--run-dir", "r"], ["run", "--keys", "k", "--data", "d", "--out", "r"],
         "out"),
    ]
    for new, old, dest in pairs:
        assert getattr(parser.parse_args(new), dest) == getattr(parser.parse_args(old), dest)
    help_text = parser.format_help()
    assert "--token-hash-file" in help_text and "--run-dir DIR" in help_text


def test_ids_are_positional_or_by_flag_and_a_disagreement_is_one_line(capsys) -> None:
    from cli.main import main

    assert main(["release", "show", "r1", "--release-id", "r2"]) == 2
    assert "RELEASE_ID r1 and --release-id r2 disagree" in capsys.readouterr().err
    assert main(["release", "show"]) == 2
    assert "give the RELEASE_ID" in capsys.readouterr().err
    assert main(["release", "show", "--release-id", "r1"]) == 2  # parsed, then: no registry in this workspace
    assert "no release registry there" in capsys.readouterr().err
