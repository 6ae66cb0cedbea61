"""Errors of the streaming commands that mean "bad input": the CLI prints one line and exits 2."""
from __future__ import annotations


class AgentError(RuntimeError):
    """The agent cannot start: the message says what to fix."""


class PublishError(ValueError):
    """A source or endpoint the publisher cannot use."""


def agent_input_errors() -> tuple[type[Exception], ...]:
    import zmq

    from adtr_edge.actors.models import PromotionError
    from adtr_edge.actors.retrain import RetrainError

    from .learning import FrameNotFound

    return AgentError, PublishError, zmq.ZMQError, RetrainError, PromotionError, FrameNotFound
