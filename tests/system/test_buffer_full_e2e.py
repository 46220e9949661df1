"""A full buffer loses nothing: intake stops at the limit, the meter keeps the rest, and once the
cloud acknowledges what was queued, the following reads bring every remaining reading, once."""

from __future__ import annotations

import json
from pathlib import Path

from drivers.readings_json import dumps
from drivers.simulators.records import random_records
from testbed.harness import LocalSystem, device_config


def test_full_buffer_stops_intake_then_recovers_everything(tmp_path: Path) -> None:
    meter = random_records("onetouch-ultra2", 40, seed=21)
    records = tmp_path / "meter.json"
    records.write_text(dumps(meter))
    with LocalSystem(tmp_path / "sys") as system:
        link = tmp_path / "ttyFULL"
        system.start_simulator("onetouch-ultra2", link, records, "--baud", "0")
        state = system.device_dir()
        assert system.provision(state).returncode == 0
        config = device_config(
            state / "glucoagent.uci",
            [(str(link), "onetouch-ultra2")],
            agent={"reread_s": "10", "health_interval_s": "3600"},
            buffer={"max_records": "25"},
            mqtt={"ack_timeout_s": "3"},
        )
        system.stop_backend()  # no acknowledgements: nothing can leave the buffer
        system.start_agent(state, config)

        def status() -> dict[str, object]:
            out = system.glucoagent(state, "status", "--json", config=config)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        assert system.wait_for(lambda: "buffer_full" in status().get("conditions", {}), timeout=30)
        depth = status()["buffer_depth"]
        assert isinstance(depth, int) and 25 <= depth <= 25 + 16  # the limit, plus the alert reserve
        text = system.glucoagent(state, "status", config=config).stdout
        assert "ALERT buffer_full" in text

        system.start_backend()  # acknowledgements flow, room appears, later reads take the rest
        assert system.wait_for(lambda: len(system.db.records(kind="reading")) >= 40, timeout=120), (
            (state / "agent.log").read_text()[-3000:]
        )
        stored = [(r.fields["glu:meter_time"], r.fields["glu:mgdl"]) for r in system.db.records(kind="reading")]
        assert sorted(stored) == sorted((m.meter_time.isoformat(), m.value_mgdl) for m in meter)
        assert system.db.records(kind="alert")  # the buffer_full alert itself reached the cloud
        assert any(r.fields.get("alert") == "buffer_full" for r in system.db.records(kind="alert"))
        assert system.wait_for(lambda: "buffer_full" not in status().get("conditions", {}), timeout=20)
