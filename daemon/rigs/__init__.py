"""Test and benchmark rigs: a private JACK server, a JACK probe client, the live benchmark."""
