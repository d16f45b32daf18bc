"""Data-provider registry: modules satisfying ``examples.mimo.interfaces.DataProvider``;
lanes.py decides which samples each rank sees."""

from typing import Dict

from examples.mimo.data import energon, hf, mock
from examples.mimo.interfaces import DataProvider

DATA_PROVIDERS: Dict[str, DataProvider] = {mock.NAME: mock, energon.NAME: energon, hf.NAME: hf}
