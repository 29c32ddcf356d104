from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Background(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKGROUND_LANCZOS: _ClassVar[Background]
    BACKGROUND_REALESRGAN: _ClassVar[Background]

class Alignment(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALIGNMENT_DETECT: _ClassVar[Alignment]
    ALIGNMENT_ALIGNED: _ClassVar[Alignment]
    ALIGNMENT_LANDMARKS: _ClassVar[Alignment]

class FaceStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACE_STATUS_UNSPECIFIED: _ClassVar[FaceStatus]
    FACE_STATUS_ENHANCED: _ClassVar[FaceStatus]
    FACE_STATUS_NO_FACE: _ClassVar[FaceStatus]
    FACE_STATUS_FALLBACK: _ClassVar[FaceStatus]
BACKGROUND_LANCZOS: Background
BACKGROUND_REALESRGAN: Background
ALIGNMENT_DETECT: Alignment
ALIGNMENT_ALIGNED: Alignment
ALIGNMENT_LANDMARKS: Alignment
FACE_STATUS_UNSPECIFIED: FaceStatus
FACE_STATUS_ENHANCED: FaceStatus
FACE_STATUS_NO_FACE: FaceStatus
FACE_STATUS_FALLBACK: FaceStatus

class FaceBatch(_message.Message):
    __slots__ = ("count", "height", "width", "channels", "data")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    count: int
    height: int
    width: int
    channels: int
    data: bytes
    def __init__(self, count: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class EnhanceOptions(_message.Message):
    __slots__ = ("output_size", "alignment", "fidelity", "only_center_face", "random_noise", "steady_video", "detect_every", "model", "background", "fidelity_weight", "mask_every")
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_FIELD_NUMBER: _ClassVar[int]
    ONLY_CENTER_FACE_FIELD_NUMBER: _ClassVar[int]
    RANDOM_NOISE_FIELD_NUMBER: _ClassVar[int]
    STEADY_VIDEO_FIELD_NUMBER: _ClassVar[int]
    DETECT_EVERY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MASK_EVERY_FIELD_NUMBER: _ClassVar[int]
    output_size: int
    alignment: Alignment
    fidelity: float
    only_center_face: bool
    random_noise: bool
    steady_video: bool
    detect_every: int
    model: str
    background: Background
    fidelity_weight: float
    mask_every: int
    def __init__(self, output_size: _Optional[int] = ..., alignment: _Optional[_Union[Alignment, str]] = ..., fidelity: _Optional[float] = ..., only_center_face: bool = ..., random_noise: bool = ..., steady_video: bool = ..., detect_every: _Optional[int] = ..., model: _Optional[str] = ..., background: _Optional[_Union[Background, str]] = ..., fidelity_weight: _Optional[float] = ..., mask_every: _Optional[int] = ...) -> None: ...

class EnhanceRequest(_message.Message):
    __slots__ = ("request_id", "faces", "options", "landmarks", "timeout_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    faces: FaceBatch
    options: EnhanceOptions
    landmarks: _containers.RepeatedScalarFieldContainer[float]
    timeout_ms: int
    def __init__(self, request_id: _Optional[int] = ..., faces: _Optional[_Union[FaceBatch, _Mapping]] = ..., options: _Optional[_Union[EnhanceOptions, _Mapping]] = ..., landmarks: _Optional[_Iterable[float]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "compute_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EnhanceResponse(_message.Message):
    __slots__ = ("request_id", "faces", "face_status", "timings", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    FACE_STATUS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    faces: FaceBatch
    face_status: _containers.RepeatedScalarFieldContainer[FaceStatus]
    timings: Timings
    error: Error
    def __init__(self, request_id: _Optional[int] = ..., faces: _Optional[_Union[FaceBatch, _Mapping]] = ..., face_status: _Optional[_Iterable[_Union[FaceStatus, str]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("model_name", "model_version", "weights_sha256", "device", "dtype", "max_faces_per_request", "min_face_size", "max_face_size", "output_sizes", "max_batch_faces", "server_version", "model_file", "arch", "channel_multiplier", "models", "default_model", "backgrounds")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_FACES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MIN_FACE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_FACE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FACES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FILE_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKGROUNDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    weights_sha256: str
    device: str
    dtype: str
    max_faces_per_request: int
    min_face_size: int
    max_face_size: int
    output_sizes: _containers.RepeatedScalarFieldContainer[int]
    max_batch_faces: int
    server_version: str
    model_file: str
    arch: str
    channel_multiplier: int
    models: _containers.RepeatedCompositeFieldContainer[Restorer]
    default_model: str
    backgrounds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., max_faces_per_request: _Optional[int] = ..., min_face_size: _Optional[int] = ..., max_face_size: _Optional[int] = ..., output_sizes: _Optional[_Iterable[int]] = ..., max_batch_faces: _Optional[int] = ..., server_version: _Optional[str] = ..., model_file: _Optional[str] = ..., arch: _Optional[str] = ..., channel_multiplier: _Optional[int] = ..., models: _Optional[_Iterable[_Union[Restorer, _Mapping]]] = ..., default_model: _Optional[str] = ..., backgrounds: _Optional[_Iterable[str]] = ...) -> None: ...

class Restorer(_message.Message):
    __slots__ = ("id", "name", "version", "arch", "weights_sha256", "model_file", "channel_multiplier", "licence", "native_size", "random_noise", "fidelity_weight")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_FILE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    LICENCE_FIELD_NUMBER: _ClassVar[int]
    NATIVE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANDOM_NOISE_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    version: str
    arch: str
    weights_sha256: str
    model_file: str
    channel_multiplier: int
    licence: str
    native_size: int
    random_noise: bool
    fidelity_weight: bool
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., arch: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., model_file: _Optional[str] = ..., channel_multiplier: _Optional[int] = ..., licence: _Optional[str] = ..., native_size: _Optional[int] = ..., random_noise: bool = ..., fidelity_weight: bool = ...) -> None: ...
