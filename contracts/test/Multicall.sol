// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @dev TEST ONLY. Many view calls to one contract in one `eth_call`: the stateful
///      property test reads the registry's whole state after every step through it.
///      Written in assembly because the embedded chain interprets every opcode in
///      Python: the Solidity loop (decode `bytes[]`, copy each call's input and
///      output, ABI-encode `bytes[]`) ran as many opcodes as the sixty views it made.
contract Multicall {
    /// @notice The raw return data of each of `calls` (ABI-encoded view calls) made to
    ///         `target`, in order; reverts if any of them reverts.
    function aggregate(address target, bytes[] calldata calls) external view returns (bytes[] memory) {
        assembly {
            let n := calls.length
            let out := mload(0x40)
            mstore(out, 0x20) // the ABI encoding of one `bytes[]`: its offset,
            mstore(add(out, 0x20), n) // its length,
            let heads := add(out, 0x40) // one offset per element (from `heads`),
            let tail := add(heads, shl(5, n)) // then each element: length, padded data
            for { let i := 0 } lt(i, n) { i := add(i, 1) } {
                let input := add(calls.offset, calldataload(add(calls.offset, shl(5, i))))
                let size := calldataload(input)
                calldatacopy(tail, add(input, 0x20), size) // the input, overwritten below
                if iszero(staticcall(gas(), target, tail, size, 0, 0)) {
                    mstore(0, shl(224, 0x08c379a0)) // Error(string)
                    mstore(4, 0x20)
                    mstore(0x24, 26)
                    mstore(0x44, "Multicall: a view reverted")
                    revert(0, 0x64)
                }
                let returned := returndatasize()
                mstore(add(heads, shl(5, i)), sub(tail, heads))
                mstore(tail, returned)
                returndatacopy(add(tail, 0x20), 0, returned)
                mstore(add(add(tail, 0x20), returned), 0) // zero the padding
                tail := add(tail, add(0x20, and(add(returned, 31), not(31))))
            }
            return(out, sub(tail, out))
        }
    }
}
