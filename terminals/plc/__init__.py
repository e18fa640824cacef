"""PLC access: the register map, a Modbus client and a reactor simulator."""
