"""The trainer, writing the run record that schema 2's code wrote (frozen in
fixtures/run_record_v2.json, "mock": these flags) instead of today's: an old checkpoint with
today's state, for test_hetero_checkpoint::test_resume_is_bit_exact to resume through the
migration."""

import json
from pathlib import Path

from examples.mimo import train_hetero
from examples.mimo.training.hetero import record

FIXTURE = Path(__file__).parents[1] / "fixtures" / "run_record_v2.json"

if __name__ == "__main__":
    schema_2 = json.loads(FIXTURE.read_text())["mock"]["common"]
    record.make = lambda cfg: dict(schema_2)
    train_hetero.run()
