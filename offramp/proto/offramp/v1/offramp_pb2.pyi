from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EncodedTensor(_message.Message):
    __slots__ = ("shape", "dtype", "scales", "token_indices", "kept_tokens", "num_prefix", "compression", "raw_size", "payload", "crc32", "bottleneck")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[EncodedTensor.DType]
        DTYPE_FLOAT32: _ClassVar[EncodedTensor.DType]
        DTYPE_FLOAT16: _ClassVar[EncodedTensor.DType]
        DTYPE_INT8: _ClassVar[EncodedTensor.DType]
    DTYPE_UNSPECIFIED: EncodedTensor.DType
    DTYPE_FLOAT32: EncodedTensor.DType
    DTYPE_FLOAT16: EncodedTensor.DType
    DTYPE_INT8: EncodedTensor.DType
    class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        COMPRESSION_NONE: _ClassVar[EncodedTensor.Compression]
        COMPRESSION_ZSTD: _ClassVar[EncodedTensor.Compression]
    COMPRESSION_NONE: EncodedTensor.Compression
    COMPRESSION_ZSTD: EncodedTensor.Compression
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_INDICES_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIX_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: EncodedTensor.DType
    scales: _containers.RepeatedScalarFieldContainer[float]
    token_indices: _containers.RepeatedScalarFieldContainer[int]
    kept_tokens: int
    num_prefix: int
    compression: EncodedTensor.Compression
    raw_size: int
    payload: bytes
    crc32: int
    bottleneck: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[EncodedTensor.DType, str]] = ..., scales: _Optional[_Iterable[float]] = ..., token_indices: _Optional[_Iterable[int]] = ..., kept_tokens: _Optional[int] = ..., num_prefix: _Optional[int] = ..., compression: _Optional[_Union[EncodedTensor.Compression, str]] = ..., raw_size: _Optional[int] = ..., payload: _Optional[bytes] = ..., crc32: _Optional[int] = ..., bottleneck: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "compute_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class OffloadRequest(_message.Message):
    __slots__ = ("request_id", "model_fingerprint", "split_block", "tokens", "audio_tokens", "modalities", "deadline_ms", "edge_stage_ms", "input")
    class EdgeStageMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    EDGE_STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    model_fingerprint: str
    split_block: int
    tokens: EncodedTensor
    audio_tokens: EncodedTensor
    modalities: _containers.RepeatedScalarFieldContainer[str]
    deadline_ms: int
    edge_stage_ms: _containers.ScalarMap[str, float]
    input: InferRequest
    def __init__(self, request_id: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., split_block: _Optional[int] = ..., tokens: _Optional[_Union[EncodedTensor, _Mapping]] = ..., audio_tokens: _Optional[_Union[EncodedTensor, _Mapping]] = ..., modalities: _Optional[_Iterable[str]] = ..., deadline_ms: _Optional[int] = ..., edge_stage_ms: _Optional[_Mapping[str, float]] = ..., input: _Optional[_Union[InferRequest, _Mapping]] = ...) -> None: ...

class OffloadReply(_message.Message):
    __slots__ = ("request_id", "status", "output", "output_shape", "timings", "batch_size")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    status: Status
    output: _containers.RepeatedScalarFieldContainer[float]
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    timings: Timings
    batch_size: int
    def __init__(self, request_id: _Optional[int] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., output: _Optional[_Iterable[float]] = ..., output_shape: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., batch_size: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("card_json", "fingerprint", "split_block", "token_shape", "max_batch_size", "max_message_bytes", "modalities", "split_blocks", "takes_input")
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TAKES_INPUT_FIELD_NUMBER: _ClassVar[int]
    card_json: str
    fingerprint: str
    split_block: int
    token_shape: _containers.RepeatedScalarFieldContainer[int]
    max_batch_size: int
    max_message_bytes: int
    modalities: _containers.RepeatedScalarFieldContainer[str]
    split_blocks: _containers.RepeatedScalarFieldContainer[int]
    takes_input: bool
    def __init__(self, card_json: _Optional[str] = ..., fingerprint: _Optional[str] = ..., split_block: _Optional[int] = ..., token_shape: _Optional[_Iterable[int]] = ..., max_batch_size: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., modalities: _Optional[_Iterable[str]] = ..., split_blocks: _Optional[_Iterable[int]] = ..., takes_input: _Optional[bool] = ...) -> None: ...

class RawTensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "encoded_file", "tensor", "audio")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FILE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    encoded_file: bytes
    tensor: RawTensor
    audio: bytes
    def __init__(self, request_id: _Optional[int] = ..., encoded_file: _Optional[bytes] = ..., tensor: _Optional[_Union[RawTensor, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("request_id", "prediction", "value", "confidence", "decided_by", "exit_index", "degraded", "degraded_reason", "output", "stage_ms", "bytes_sent", "status", "label", "route")
    class StageMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    EXIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    prediction: int
    value: float
    confidence: float
    decided_by: str
    exit_index: int
    degraded: bool
    degraded_reason: str
    output: _containers.RepeatedScalarFieldContainer[float]
    stage_ms: _containers.ScalarMap[str, float]
    bytes_sent: int
    status: Status
    label: str
    route: str
    def __init__(self, request_id: _Optional[int] = ..., prediction: _Optional[int] = ..., value: _Optional[float] = ..., confidence: _Optional[float] = ..., decided_by: _Optional[str] = ..., exit_index: _Optional[int] = ..., degraded: _Optional[bool] = ..., degraded_reason: _Optional[str] = ..., output: _Optional[_Iterable[float]] = ..., stage_ms: _Optional[_Mapping[str, float]] = ..., bytes_sent: _Optional[int] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., label: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Policy(_message.Message):
    __slots__ = ("thresholds", "score", "offload_enabled", "adaptive", "state", "split_block", "route")
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_ENABLED_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    thresholds: _containers.RepeatedScalarFieldContainer[float]
    score: str
    offload_enabled: bool
    adaptive: bool
    state: PolicyState
    split_block: int
    route: str
    def __init__(self, thresholds: _Optional[_Iterable[float]] = ..., score: _Optional[str] = ..., offload_enabled: _Optional[bool] = ..., adaptive: _Optional[bool] = ..., state: _Optional[_Union[PolicyState, _Mapping]] = ..., split_block: _Optional[int] = ..., route: _Optional[str] = ...) -> None: ...

class PolicyState(_message.Message):
    __slots__ = ("rtt_ms", "transfer_ms", "uplink_bytes_per_s", "offload_bytes", "cloud_ms", "cloud_queue_ms", "cloud_compute_ms", "edge_queue_ms", "request_rate", "compute_ms", "latency_slo_ms", "predicted_p95_ms", "target_met", "expected_accuracy", "expected_offload", "split_block", "reason", "changes", "chosen_thresholds", "slo_window_s", "planned_tail")
    class ComputeMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    UPLINK_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLOUD_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    EDGE_QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_RATE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_P95_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MET_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    SPLIT_BLOCK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    SLO_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    PLANNED_TAIL_FIELD_NUMBER: _ClassVar[int]
    rtt_ms: float
    transfer_ms: float
    uplink_bytes_per_s: float
    offload_bytes: float
    cloud_ms: float
    cloud_queue_ms: float
    cloud_compute_ms: float
    edge_queue_ms: float
    request_rate: float
    compute_ms: _containers.ScalarMap[str, float]
    latency_slo_ms: float
    predicted_p95_ms: float
    target_met: bool
    expected_accuracy: float
    expected_offload: float
    split_block: int
    reason: str
    changes: int
    chosen_thresholds: _containers.RepeatedScalarFieldContainer[float]
    slo_window_s: float
    planned_tail: float
    def __init__(self, rtt_ms: _Optional[float] = ..., transfer_ms: _Optional[float] = ..., uplink_bytes_per_s: _Optional[float] = ..., offload_bytes: _Optional[float] = ..., cloud_ms: _Optional[float] = ..., cloud_queue_ms: _Optional[float] = ..., cloud_compute_ms: _Optional[float] = ..., edge_queue_ms: _Optional[float] = ..., request_rate: _Optional[float] = ..., compute_ms: _Optional[_Mapping[str, float]] = ..., latency_slo_ms: _Optional[float] = ..., predicted_p95_ms: _Optional[float] = ..., target_met: _Optional[bool] = ..., expected_accuracy: _Optional[float] = ..., expected_offload: _Optional[float] = ..., split_block: _Optional[int] = ..., reason: _Optional[str] = ..., changes: _Optional[int] = ..., chosen_thresholds: _Optional[_Iterable[float]] = ..., slo_window_s: _Optional[float] = ..., planned_tail: _Optional[float] = ...) -> None: ...
