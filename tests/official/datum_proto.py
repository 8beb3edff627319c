"""``delf.protos.DatumProto`` declared from its .proto definition with the protobuf library, to make
``.datum`` bytes independently of extract/official/datum.py (used by the tests and by tf_reference.py)."""
from __future__ import annotations

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_INT64, _FLOAT, _MESSAGE, _OPTIONAL, _REPEATED = 3, 2, 11, 1, 3


def datum_class(packed: bool = True) -> type:
    """The DatumProto message class (repeated numbers packed, as the official .proto, or not)."""
    f = descriptor_pb2.FileDescriptorProto(name=f"datum_test_{packed}.proto", package="delf.protos", syntax="proto2")
    options = descriptor_pb2.FieldOptions(packed=packed)
    f.message_type.add(name="DatumShape").field.add(name="dim", number=1, type=_INT64, label=_REPEATED,
                                                    options=options)
    f.message_type.add(name="FloatList").field.add(name="value", number=1, type=_FLOAT, label=_REPEATED,
                                                   options=options)
    datum = f.message_type.add(name="DatumProto")
    datum.field.add(name="shape", number=1, type=_MESSAGE, label=_OPTIONAL, type_name=".delf.protos.DatumShape")
    datum.field.add(name="float_list", number=2, type=_MESSAGE, label=_OPTIONAL, type_name=".delf.protos.FloatList")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("delf.protos.DatumProto"))


def datum_bytes(array: np.ndarray, shape: tuple[int, ...] | None = None, packed: bool = True) -> bytes:
    """A serialised DatumProto of ``array`` (row-major), declaring ``shape`` (default: the array's)."""
    msg = datum_class(packed)()
    msg.shape.dim.extend(array.shape if shape is None else shape)
    msg.float_list.value.extend(np.asarray(array, np.float32).ravel().tolist())
    return msg.SerializeToString()
