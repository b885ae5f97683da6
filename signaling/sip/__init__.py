"""SIP/IVR bridge: phones call in over SIP with G.711 RTP and join rooms as participants (docs/SIP.md)."""
