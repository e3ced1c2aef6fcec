"""Pipelined batch decoding (MoE-Lightning): the hierarchical roofline model and policy search
(hrm, machine), and the CPU side of CGOPipe (attention next to a host-resident KV cache:
moekit.native.attention)."""
