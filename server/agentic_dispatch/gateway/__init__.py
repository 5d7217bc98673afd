"""The run gateway: how runs with network transfer get their workspace and send their results back.

Its parts are imported from their modules (:mod:`.server`, :mod:`.tokens`, :mod:`.transfer`): the server's
HTTP and git machinery is loaded only by a process that serves runs over the network.
"""
