"""Data-provider registry. A provider owns its flags and turns sample indices into samples;
lanes.py decides which samples each rank sees."""

from typing import Dict

from examples.mimo.data import mock

DATA_PROVIDERS: Dict[str, object] = {mock.NAME: mock}
