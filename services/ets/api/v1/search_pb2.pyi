from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchConfig(_message.Message):
    __slots__ = ("method", "width", "temperature", "max_step_tokens", "max_tokens", "max_depth", "softmax_temperature", "lambda_c", "lambda_s", "cluster_distance", "aggregation", "voting", "seed", "policy_model_type", "prm_type", "node_cost", "solver_time_limit_s", "beam_keep", "early_stop")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SOFTMAX_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_C_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_S_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    VOTING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    POLICY_MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    PRM_TYPE_FIELD_NUMBER: _ClassVar[int]
    NODE_COST_FIELD_NUMBER: _ClassVar[int]
    SOLVER_TIME_LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    BEAM_KEEP_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOP_FIELD_NUMBER: _ClassVar[int]
    method: str
    width: int
    temperature: float
    max_step_tokens: int
    max_tokens: int
    max_depth: int
    softmax_temperature: float
    lambda_c: float
    lambda_s: float
    cluster_distance: float
    aggregation: str
    voting: str
    seed: int
    policy_model_type: str
    prm_type: str
    node_cost: str
    solver_time_limit_s: float
    beam_keep: int
    early_stop: bool
    def __init__(self, method: _Optional[str] = ..., width: _Optional[int] = ..., temperature: _Optional[float] = ..., max_step_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_depth: _Optional[int] = ..., softmax_temperature: _Optional[float] = ..., lambda_c: _Optional[float] = ..., lambda_s: _Optional[float] = ..., cluster_distance: _Optional[float] = ..., aggregation: _Optional[str] = ..., voting: _Optional[str] = ..., seed: _Optional[int] = ..., policy_model_type: _Optional[str] = ..., prm_type: _Optional[str] = ..., node_cost: _Optional[str] = ..., solver_time_limit_s: _Optional[float] = ..., beam_keep: _Optional[int] = ..., early_stop: _Optional[bool] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("problem", "config", "request_id", "summary_only")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_ONLY_FIELD_NUMBER: _ClassVar[int]
    problem: str
    config: SearchConfig
    request_id: str
    summary_only: bool
    def __init__(self, problem: _Optional[str] = ..., config: _Optional[_Union[SearchConfig, _Mapping]] = ..., request_id: _Optional[str] = ..., summary_only: _Optional[bool] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("text", "answer", "step_scores", "aggregate_score", "finish_reason", "depth", "tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    STEP_SCORES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_SCORE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    answer: str
    step_scores: _containers.RepeatedScalarFieldContainer[float]
    aggregate_score: float
    finish_reason: str
    depth: int
    tokens: int
    def __init__(self, text: _Optional[str] = ..., answer: _Optional[str] = ..., step_scores: _Optional[_Iterable[float]] = ..., aggregate_score: _Optional[float] = ..., finish_reason: _Optional[str] = ..., depth: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class SearchStats(_message.Message):
    __slots__ = ("total_kv_tokens", "peak_kv_tokens", "model_calls", "generated_tokens", "prompt_tokens", "cached_prompt_tokens", "selection_seconds", "depth_reached", "wall_seconds", "selections", "solver_fallbacks", "policy_seconds", "reward_seconds", "stopped_early", "width_left", "solver_time_limits", "token_budget_hit")
    TOTAL_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PEAK_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CALLS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_REACHED_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SELECTIONS_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    POLICY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_EARLY_FIELD_NUMBER: _ClassVar[int]
    WIDTH_LEFT_FIELD_NUMBER: _ClassVar[int]
    SOLVER_TIME_LIMITS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_HIT_FIELD_NUMBER: _ClassVar[int]
    total_kv_tokens: int
    peak_kv_tokens: int
    model_calls: int
    generated_tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int
    selection_seconds: float
    depth_reached: int
    wall_seconds: float
    selections: int
    solver_fallbacks: int
    policy_seconds: float
    reward_seconds: float
    stopped_early: bool
    width_left: int
    solver_time_limits: int
    token_budget_hit: bool
    def __init__(self, total_kv_tokens: _Optional[int] = ..., peak_kv_tokens: _Optional[int] = ..., model_calls: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., selection_seconds: _Optional[float] = ..., depth_reached: _Optional[int] = ..., wall_seconds: _Optional[float] = ..., selections: _Optional[int] = ..., solver_fallbacks: _Optional[int] = ..., policy_seconds: _Optional[float] = ..., reward_seconds: _Optional[float] = ..., stopped_early: _Optional[bool] = ..., width_left: _Optional[int] = ..., solver_time_limits: _Optional[int] = ..., token_budget_hit: _Optional[bool] = ...) -> None: ...

class AnswerVote(_message.Message):
    __slots__ = ("answer", "trajectories", "vote", "best_score")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    VOTE_FIELD_NUMBER: _ClassVar[int]
    BEST_SCORE_FIELD_NUMBER: _ClassVar[int]
    answer: str
    trajectories: int
    vote: float
    best_score: float
    def __init__(self, answer: _Optional[str] = ..., trajectories: _Optional[int] = ..., vote: _Optional[float] = ..., best_score: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("request_id", "answer", "best", "candidates", "stats", "config", "candidates_omitted", "grouping_fallback", "votes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_OMITTED_FIELD_NUMBER: _ClassVar[int]
    GROUPING_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    answer: str
    best: Candidate
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    stats: SearchStats
    config: SearchConfig
    candidates_omitted: bool
    grouping_fallback: bool
    votes: _containers.RepeatedCompositeFieldContainer[AnswerVote]
    def __init__(self, request_id: _Optional[str] = ..., answer: _Optional[str] = ..., best: _Optional[_Union[Candidate, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., stats: _Optional[_Union[SearchStats, _Mapping]] = ..., config: _Optional[_Union[SearchConfig, _Mapping]] = ..., candidates_omitted: _Optional[bool] = ..., grouping_fallback: _Optional[bool] = ..., votes: _Optional[_Iterable[_Union[AnswerVote, _Mapping]]] = ...) -> None: ...

class DepthProgress(_message.Message):
    __slots__ = ("depth", "frontier_size", "kept_candidates", "kv_tokens", "elapsed_seconds", "remaining_width", "finished", "generated_tokens", "prompt_tokens", "cached_prompt_tokens")
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    FRONTIER_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEPT_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_WIDTH_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    depth: int
    frontier_size: int
    kept_candidates: int
    kv_tokens: int
    elapsed_seconds: float
    remaining_width: int
    finished: int
    generated_tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int
    def __init__(self, depth: _Optional[int] = ..., frontier_size: _Optional[int] = ..., kept_candidates: _Optional[int] = ..., kv_tokens: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., remaining_width: _Optional[int] = ..., finished: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class SearchEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: DepthProgress
    result: SearchResponse
    def __init__(self, progress: _Optional[_Union[DepthProgress, _Mapping]] = ..., result: _Optional[_Union[SearchResponse, _Mapping]] = ...) -> None: ...
