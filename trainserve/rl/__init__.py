"""Reinforcement learning (GRPO) with rollouts from the colocated engine."""
