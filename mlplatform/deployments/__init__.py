"""Serving: the extended model on Ray Serve, the ingress, traffic and the Open Inference Protocol."""
