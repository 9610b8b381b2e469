"""The model: networks, spatial layers, losses, attribute encoding and the safetensors model file."""
