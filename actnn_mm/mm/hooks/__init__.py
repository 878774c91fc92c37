from .actnn_hook import ActNNHook

__all__ = ['ActNNHook']
