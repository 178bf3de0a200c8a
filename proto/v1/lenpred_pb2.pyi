from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class HeadSelector(_message.Message):
    __slots__ = ("model_id", "hidden_size", "layer", "version")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    hidden_size: int
    layer: int
    version: str
    def __init__(self, model_id: _Optional[str] = ..., hidden_size: _Optional[int] = ..., layer: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class PrefillBlock(_message.Message):
    __slots__ = ("rids", "prompt_tokens", "vectors", "entropy_mean", "last_vectors", "max_new_tokens")
    RIDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_MEAN_FIELD_NUMBER: _ClassVar[int]
    LAST_VECTORS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    rids: _containers.RepeatedScalarFieldContainer[str]
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    vectors: Tensor
    entropy_mean: _containers.RepeatedScalarFieldContainer[float]
    last_vectors: Tensor
    max_new_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, rids: _Optional[_Iterable[str]] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., vectors: _Optional[_Union[Tensor, _Mapping]] = ..., entropy_mean: _Optional[_Iterable[float]] = ..., last_vectors: _Optional[_Union[Tensor, _Mapping]] = ..., max_new_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeBlock(_message.Message):
    __slots__ = ("rids", "steps", "vectors")
    RIDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    rids: _containers.RepeatedScalarFieldContainer[str]
    steps: _containers.RepeatedScalarFieldContainer[int]
    vectors: Tensor
    def __init__(self, rids: _Optional[_Iterable[str]] = ..., steps: _Optional[_Iterable[int]] = ..., vectors: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("rid", "output_tokens", "prompt_tokens", "truncated", "aborted", "max_new_tokens")
    RID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    rid: str
    output_tokens: int
    prompt_tokens: int
    truncated: bool
    aborted: bool
    max_new_tokens: int
    def __init__(self, rid: _Optional[str] = ..., output_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., aborted: _Optional[bool] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class IngestBatch(_message.Message):
    __slots__ = ("head", "engine_id", "seq", "prefill", "decode", "finished")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    head: HeadSelector
    engine_id: str
    seq: int
    prefill: PrefillBlock
    decode: DecodeBlock
    finished: _containers.RepeatedCompositeFieldContainer[Finished]
    def __init__(self, head: _Optional[_Union[HeadSelector, _Mapping]] = ..., engine_id: _Optional[str] = ..., seq: _Optional[int] = ..., prefill: _Optional[_Union[PrefillBlock, _Mapping]] = ..., decode: _Optional[_Union[DecodeBlock, _Mapping]] = ..., finished: _Optional[_Iterable[_Union[Finished, _Mapping]]] = ...) -> None: ...

class IngestAck(_message.Message):
    __slots__ = ("seq", "accepted", "rejected", "code", "message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    accepted: int
    rejected: int
    code: int
    message: str
    def __init__(self, seq: _Optional[int] = ..., accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("head", "prompt_vectors", "decode_vectors", "decode_steps", "rids", "prompt_feature")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    PROMPT_VECTORS_FIELD_NUMBER: _ClassVar[int]
    DECODE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    RIDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FEATURE_FIELD_NUMBER: _ClassVar[int]
    head: HeadSelector
    prompt_vectors: Tensor
    decode_vectors: Tensor
    decode_steps: _containers.RepeatedScalarFieldContainer[int]
    rids: _containers.RepeatedScalarFieldContainer[str]
    prompt_feature: str
    def __init__(self, head: _Optional[_Union[HeadSelector, _Mapping]] = ..., prompt_vectors: _Optional[_Union[Tensor, _Mapping]] = ..., decode_vectors: _Optional[_Union[Tensor, _Mapping]] = ..., decode_steps: _Optional[_Iterable[int]] = ..., rids: _Optional[_Iterable[str]] = ..., prompt_feature: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("rid", "mean", "p50", "p90", "remaining_p50", "remaining_p90", "step", "head_version", "source")
    RID_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    P50_FIELD_NUMBER: _ClassVar[int]
    P90_FIELD_NUMBER: _ClassVar[int]
    REMAINING_P50_FIELD_NUMBER: _ClassVar[int]
    REMAINING_P90_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HEAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    rid: str
    mean: float
    p50: float
    p90: float
    remaining_p50: float
    remaining_p90: float
    step: int
    head_version: str
    source: str
    def __init__(self, rid: _Optional[str] = ..., mean: _Optional[float] = ..., p50: _Optional[float] = ..., p90: _Optional[float] = ..., remaining_p50: _Optional[float] = ..., remaining_p90: _Optional[float] = ..., step: _Optional[int] = ..., head_version: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions",)
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeadInfo(_message.Message):
    __slots__ = ("kind", "key", "input_dim", "num_bins", "bin_edges", "data_hash", "metadata_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_BINS_FIELD_NUMBER: _ClassVar[int]
    BIN_EDGES_FIELD_NUMBER: _ClassVar[int]
    DATA_HASH_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    key: HeadSelector
    input_dim: int
    num_bins: int
    bin_edges: _containers.RepeatedScalarFieldContainer[float]
    data_hash: str
    metadata_json: str
    def __init__(self, kind: _Optional[str] = ..., key: _Optional[_Union[HeadSelector, _Mapping]] = ..., input_dim: _Optional[int] = ..., num_bins: _Optional[int] = ..., bin_edges: _Optional[_Iterable[float]] = ..., data_hash: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("heads", "device", "max_batch", "max_wait_us", "max_rows_per_message")
    HEADS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_US_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[HeadInfo]
    device: str
    max_batch: int
    max_wait_us: int
    max_rows_per_message: int
    def __init__(self, heads: _Optional[_Iterable[_Union[HeadInfo, _Mapping]]] = ..., device: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_wait_us: _Optional[int] = ..., max_rows_per_message: _Optional[int] = ...) -> None: ...
