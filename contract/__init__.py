"""The contract's Python side, shared by the client, the service and the MuseTalk adapter.

`types`: options, statuses, results and limits as plain Python and numpy; `codec`: those to and
from the faceenhance.v1 messages, with the checks every request passes; `pb`: the generated
stubs of proto/faceenhance/v1/face_enhance.proto. No torch and no gRPC server here.
"""
