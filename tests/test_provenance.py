"""Every results file records where it came from (issue 17): command, git revision, full config,
library versions, wall time, and for an evaluation of earlier checkpoints, each checkpoint with
the provenance its workdir recorded."""

from __future__ import annotations

import json

from ling_jax.config import get_preset
from ling_jax.provenance import LIBRARIES, Provenance, git_revision
from ling_jax.workdir import write_record


def test_results_file_records_command_revision_config_versions_and_checkpoints(tmp_path):
    config = get_preset("cpu-tiny")
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "50").mkdir(parents=True)
    write_record(workdir, config, schedule_steps=50)
    recorded = json.loads((workdir / "config.json").read_text())["provenance"]
    assert {"command", "git_revision", "versions"} <= set(recorded)

    prov = Provenance("experiments/some_eval.py", ["--json", "out.json"])
    out = prov.write(tmp_path / "out.json", {"bpb": 1.5}, config=config, checkpoints=[workdir])
    assert json.loads((tmp_path / "out.json").read_text()) == out
    assert out["bpb"] == 1.5 and out["command"] == "python experiments/some_eval.py --json out.json"
    assert out["git_revision"] == git_revision() != "" and out["wall_s"] >= 0
    assert set(LIBRARIES) <= set(out["versions"]) and {"jax", "jaxlib", "flax", "optax"} <= set(out["versions"])
    assert out["config"]["model"]["d_model"] == config.model.d_model and out["config"]["train"]["steps"] == 50
    (ckpt,) = out["checkpoints"]
    assert ckpt["workdir"] == str(workdir) and ckpt["step"] == 50 and ckpt["schedule_steps"] == 50
    assert ckpt["config"]["model"]["d_model"] == config.model.d_model and ckpt["trained_by"] == recorded


def test_a_recorded_command_names_no_machine_path(tmp_path):
    from ling_jax.provenance import REPO, command_line

    command = command_line("experiments/main_job.py", ["--workdir", str(tmp_path / "mj"), "--json",
                                                        str(REPO / "experiments/results/main_job.json"),
                                                        f"--root={tmp_path}/kr", "--note", "a b"])
    assert command == ("python experiments/main_job.py --workdir $TMPDIR/mj --json experiments/results/main_job.json "
                       "--root=$TMPDIR/kr --note 'a b'")
