from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Trajectory(_message.Message):
    __slots__ = ("question", "steps")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    question: str
    steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, question: _Optional[str] = ..., steps: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("trajectories", "last_step_only", "prm_type")
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_ONLY_FIELD_NUMBER: _ClassVar[int]
    PRM_TYPE_FIELD_NUMBER: _ClassVar[int]
    trajectories: _containers.RepeatedCompositeFieldContainer[Trajectory]
    last_step_only: bool
    prm_type: str
    def __init__(self, trajectories: _Optional[_Iterable[_Union[Trajectory, _Mapping]]] = ..., last_step_only: _Optional[bool] = ..., prm_type: _Optional[str] = ...) -> None: ...

class StepScores(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "prompt_tokens", "cached_tokens")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StepScores]
    prompt_tokens: int
    cached_tokens: int
    def __init__(self, results: _Optional[_Iterable[_Union[StepScores, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "dim")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dim: int
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dim: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("prm_type", "prm_backend", "prm_model", "embedder_model", "embedding_dim", "max_batch_size")
    PRM_TYPE_FIELD_NUMBER: _ClassVar[int]
    PRM_BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRM_MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    prm_type: str
    prm_backend: str
    prm_model: str
    embedder_model: str
    embedding_dim: int
    max_batch_size: int
    def __init__(self, prm_type: _Optional[str] = ..., prm_backend: _Optional[str] = ..., prm_model: _Optional[str] = ..., embedder_model: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., max_batch_size: _Optional[int] = ...) -> None: ...
