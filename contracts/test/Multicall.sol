// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @dev TEST ONLY. Many view calls to one contract in one `eth_call`: the stateful
///      property test reads the registry's whole state after every step through it.
contract Multicall {
    /// @notice The raw return data of each of `calls` (ABI-encoded view calls) made to
    ///         `target`, in order; reverts if any of them reverts.
    function aggregate(address target, bytes[] calldata calls) external view returns (bytes[] memory results) {
        results = new bytes[](calls.length);
        for (uint256 i; i < calls.length; ++i) {
            (bool ok, bytes memory out) = target.staticcall(calls[i]);
            require(ok, "Multicall: a view reverted");
            results[i] = out;
        }
    }
}
