"""Connectors between the vision tower and the LLM; add one with a class here and a YAML in configs/model/connector."""

from alignlm.models.connectors.base import Connector, ConnectorOutput
from alignlm.models.connectors.linear import LinearConnector
from alignlm.models.connectors.mlp import MLPConnector
from alignlm.models.connectors.moe import MoEConnector

__all__ = ["Connector", "ConnectorOutput", "LinearConnector", "MLPConnector", "MoEConnector"]
