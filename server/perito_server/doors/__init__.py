"""The protocol doors over `perito_server.inference.InferenceService`, siblings that never
import each other: `perito_grpc` (perito.v1 over gRPC), `oip_grpc` and `oip_rest` (the Open
Inference Protocol over gRPC and HTTP), `json_api` (the JSON API for people and the web page).
Each only translates its protocol's requests into the service's calls and the answers and
errors back; the two HTTP doors share their edge (auth, errors, bodies) in `_http`."""
