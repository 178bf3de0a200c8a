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

class Feature(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_NONE: _ClassVar[Feature]
    FEATURE_POOLED: _ClassVar[Feature]
    FEATURE_LAST: _ClassVar[Feature]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
FEATURE_NONE: Feature
FEATURE_POOLED: Feature
FEATURE_LAST: Feature

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

class Batch(_message.Message):
    __slots__ = ("head", "engine_id", "seq", "bind_handles", "bind_rids", "prefill_handles", "prompt_tokens", "prefill_max_new_tokens", "prefill_features", "decode_handles", "decode_steps", "dtype", "vectors", "finished_handles", "output_tokens", "finished_prompt_tokens", "finished_flags", "finished_max_new_tokens")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BIND_HANDLES_FIELD_NUMBER: _ClassVar[int]
    BIND_RIDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_HANDLES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    DECODE_HANDLES_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_HANDLES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FLAGS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    head: HeadSelector
    engine_id: str
    seq: int
    bind_handles: bytes
    bind_rids: _containers.RepeatedScalarFieldContainer[str]
    prefill_handles: bytes
    prompt_tokens: bytes
    prefill_max_new_tokens: bytes
    prefill_features: int
    decode_handles: bytes
    decode_steps: bytes
    dtype: DType
    vectors: bytes
    finished_handles: bytes
    output_tokens: bytes
    finished_prompt_tokens: bytes
    finished_flags: bytes
    finished_max_new_tokens: bytes
    def __init__(self, head: _Optional[_Union[HeadSelector, _Mapping]] = ..., engine_id: _Optional[str] = ..., seq: _Optional[int] = ..., bind_handles: _Optional[bytes] = ..., bind_rids: _Optional[_Iterable[str]] = ..., prefill_handles: _Optional[bytes] = ..., prompt_tokens: _Optional[bytes] = ..., prefill_max_new_tokens: _Optional[bytes] = ..., prefill_features: _Optional[int] = ..., decode_handles: _Optional[bytes] = ..., decode_steps: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., vectors: _Optional[bytes] = ..., finished_handles: _Optional[bytes] = ..., output_tokens: _Optional[bytes] = ..., finished_prompt_tokens: _Optional[bytes] = ..., finished_flags: _Optional[bytes] = ..., finished_max_new_tokens: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
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
